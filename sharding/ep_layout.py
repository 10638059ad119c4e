"""Where experts live under expert parallelism, and the checks that reject a layout before tracing. Experts are laid
out contiguously: EP rank r holds experts [r·E/EP, (r+1)·E/EP), so each routing group sits on (or spans) whole ranks.
"""

from __future__ import annotations

import numpy as np

EP_IMPLS = ("all_to_all", "ragged", "ragged_reference")


def check_expert_parallel(n_experts: int, ep: int, *, impl: str = "all_to_all", capacity_factor: float = 1.0,
                          tokens: int | None = None, token_shards: int = 1, max_rounds: int | None = None,
                          node_size: int = 0) -> None:
    """Raises a one-line ValueError naming the field when this expert-parallel configuration cannot run."""
    if ep < 1:
        raise ValueError(f"mesh.expert={ep}: the expert axis size must be positive")
    if n_experts % ep:
        raise ValueError(f"mesh.expert={ep} does not divide n_routed_experts={n_experts}")
    if impl not in EP_IMPLS:
        raise ValueError(f"expert_parallel.impl={impl!r}: expected one of {', '.join(EP_IMPLS)}")
    if not capacity_factor > 0:
        raise ValueError(f"expert_parallel.capacity_factor={capacity_factor}: must be > 0")
    if max_rounds is not None and max_rounds < 1:
        raise ValueError(f"expert_parallel.max_rounds={max_rounds}: must be >= 1, or None for dropless")
    if node_size < 0 or (node_size and ep % node_size):
        raise ValueError(f"mesh.expert_node_size={node_size}: must divide mesh.expert={ep} (0: one node)")
    if tokens is not None and tokens % token_shards:
        raise ValueError(f"tokens={tokens} is not divisible by the {token_shards} token shards "
                         f"(batch axes × mesh.expert={ep})")


def expert_ranks(n_experts: int, ep: int) -> np.ndarray:
    """rank_E[e]: the EP rank holding expert e (E/EP contiguous experts per rank)."""
    check_expert_parallel(n_experts, ep)
    return np.arange(n_experts) // (n_experts // ep)


def group_ranks(n_group: int, ep: int) -> list[tuple[int, ...]]:
    """The EP ranks holding each routing group: group g lives on ranks g·EP//n_group … (g+1)·EP//n_group − 1,
    or on rank g·EP//n_group alone when several groups share a rank."""
    if n_group < 1:
        raise ValueError(f"n_group={n_group}: must be positive")
    if n_group % ep and ep % n_group:
        raise ValueError(f"mesh.expert={ep} and n_group={n_group}: one must divide the other so groups map "
                         f"onto whole ranks")
    if n_group >= ep:
        return [(g * ep // n_group,) for g in range(n_group)]
    span = ep // n_group
    return [tuple(range(g * span, (g + 1) * span)) for g in range(n_group)]


def max_ranks_per_token(n_group: int, topk_group: int, ep: int) -> int:
    """The most EP ranks a token can reach when it picks experts from `topk_group` of `n_group` groups: routing groups
    are contiguous like the experts, so node-limited routing bounds a token's destination ranks."""
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group}: must be in [1, n_group={n_group}]")
    return min(ep, topk_group * len(group_ranks(n_group, ep)[0]))


def ranks_per_token(experts_TK, n_experts: int, ep: int) -> np.ndarray:
    """Distinct destination EP ranks of each token's choices (numpy; for checks and reports)."""
    ranks_TK = expert_ranks(n_experts, ep)[np.asarray(experts_TK)]
    hit_TP = np.zeros((ranks_TK.shape[0], ep), bool)
    hit_TP[np.arange(ranks_TK.shape[0])[:, None], ranks_TK] = True
    return hit_TP.sum(axis=1)


def group_limited_top_k(scores_TE, n_group: int, topk_group: int, k: int) -> np.ndarray:
    """The router's node-limited choice in numpy (for checks and buffer sizing): the top-k experts among each
    token's best `topk_group` groups, a group scored by the sum of its top-2 expert scores."""
    t, e = scores_TE.shape
    grouped_TGe = scores_TE.reshape(t, n_group, e // n_group)
    group_score_TG = np.sort(grouped_TGe, axis=-1)[..., -2:].sum(-1)
    kept_TG = np.argsort(-group_score_TG, axis=1)[:, :topk_group]
    keep_TG = np.zeros((t, n_group), bool)
    keep_TG[np.arange(t)[:, None], kept_TG] = True
    masked_TE = np.where(keep_TG[:, :, None], grouped_TGe, -np.inf).reshape(t, e)
    return np.argsort(-masked_TE, axis=1)[:, :k]
