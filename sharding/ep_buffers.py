"""Receive-buffer sizes of the expert-parallel exchange, next to the balanced and the worst-case sizes."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from sharding.ep_layout import check_expert_parallel, group_limited_top_k, ranks_per_token


def capacity_per_peer(rows_per_rank: int, ep: int, capacity_factor: float, block_multiple: int = 8) -> int:
    """C: rows one rank may send to one peer in one round, ceil(capacity_factor · T_local·K / EP) rounded up to
    `block_multiple`. Per round each rank so receives at most EP·C rows, where a buffer sized for the worst case
    (every rank sends all its rows that can reach one rank to that rank) needs T_local·K·min(EP, E/K) rows."""
    rows = max(1, math.ceil(capacity_factor * rows_per_rank / ep))
    return -(-rows // block_multiple) * block_multiple


@dataclasses.dataclass(frozen=True)
class EPBuffers:
    tokens_per_rank: int
    top_k: int
    ep: int
    capacity_per_peer: int   # C
    balanced_rows: int       # T_local·K: what each rank receives when routing is perfectly balanced
    buffer_rows: int         # EP·C: the receive buffer of one round
    worst_case_rows: int     # EP·T_local·min(K, E/EP): a single-shot dropless receive buffer
    row_bytes: int           # D · itemsize

    @property
    def buffer_bytes(self) -> int:
        return self.buffer_rows * self.row_bytes

    @property
    def balanced_bytes(self) -> int:
        return self.balanced_rows * self.row_bytes

    @property
    def worst_case_bytes(self) -> int:
        return self.worst_case_rows * self.row_bytes

    def rounds_for(self, max_rows_to_one_peer: int) -> int:
        """Rounds needed when the busiest (sender, receiver) pair carries this many rows."""
        return max(1, -(-int(max_rows_to_one_peer) // self.capacity_per_peer))


def ep_buffer_size(tokens_per_rank: int, top_k: int, n_experts: int, ep: int, *, capacity_factor: float = 1.25,
                   block_multiple: int = 8, d_model: int = 0, dtype="bfloat16") -> EPBuffers:
    """Rows (and bytes, for rows of `d_model` elements of `dtype`) of one rank's per-round receive buffer."""
    check_expert_parallel(n_experts, ep, capacity_factor=capacity_factor)
    rows = tokens_per_rank * top_k
    c = capacity_per_peer(rows, ep, capacity_factor, block_multiple)
    worst = ep * tokens_per_rank * min(top_k, n_experts // ep)
    return EPBuffers(tokens_per_rank, top_k, ep, c, rows, ep * c, worst, d_model * jnp.dtype(dtype).itemsize)


@functools.lru_cache(maxsize=64)
def expected_destinations(n_experts: int, top_k: int, n_group: int, topk_group: int, units: int,
                          samples: int = 8192) -> float:
    """Expected distinct units (nodes or ranks: `units` contiguous blocks of experts) one token's top_k choices
    reach under balanced routing: the router's group-limited rule (ep_layout.group_limited_top_k: best topk_group
    groups by the sum of their top-2 scores, then the top_k experts among them) on i.i.d. uniform scores, averaged
    over `samples` tokens of a fixed seed (so the buffers it sizes are the same on every rank and every run)."""
    if n_experts % units:
        raise ValueError(f"{units} destinations do not divide n_routed_experts={n_experts}")
    scores_TE = np.random.default_rng(0).random((samples, n_experts))
    experts_TK = group_limited_top_k(scores_TE, n_group, topk_group, top_k)
    return float(ranks_per_token(experts_TK, n_experts, units).mean())


@dataclasses.dataclass(frozen=True)
class ExchangeBuffers:
    """Per-round buffers of the deduplicated exchange (sharding.ep_exchange) on one rank.

    With N nodes of L ranks, T tokens per rank, d_node and d_rank the expected distinct nodes and ranks per token
    (expected_destinations) and f the capacity factor: a rank sends a node ≈ T·d_node/N rows, so the inter-node hop
    moves C₁ = ⌈f·T·d_node/N⌉ per pair; it receives ≈ T·d_node rows and forwards each to d_rank/d_node ranks of its
    node, so the intra-node hop moves C₂ = ⌈f·T·d_rank/L⌉ per pair; the owning rank runs ≈ T·K (row, expert)
    pairs, in passes of f·T·K. One node (or one rank per node) is one hop of ⌈f·T·d_rank/EP⌉."""
    capacities: tuple[int, ...]   # C per hop, inter-node first
    expert_rows: int              # rows of one expert pass
    nodes_per_token: float        # d_node (1 for one node)
    ranks_per_token: float        # d_rank


def exchange_buffers(tokens_per_rank: int, n_experts: int, top_k: int, ep: int, node_size: int, *,
                     n_group: int = 1, topk_group: int = 1, capacity_factor: float = 1.25,
                     block_multiple: int = 8) -> ExchangeBuffers:
    """The capacities of ExchangeBuffers for an expert axis of `ep` ranks in nodes of `node_size` (0: one node)."""
    check_expert_parallel(n_experts, ep, capacity_factor=capacity_factor, node_size=node_size)
    nodes = ep // (node_size or ep)
    d_rank = expected_destinations(n_experts, top_k, n_group, topk_group, ep)
    d_node = expected_destinations(n_experts, top_k, n_group, topk_group, nodes) if nodes > 1 else 1.0
    cap = lambda rows, peers: capacity_per_peer(max(1, math.ceil(rows)), peers, capacity_factor, block_multiple)
    t = tokens_per_rank
    if nodes == 1 or node_size == 1:
        capacities = (cap(t * d_rank, ep),)
    else:
        capacities = (cap(t * d_node, nodes), cap(t * d_rank, node_size))
    expert_rows = cap(t * top_k, 1)
    return ExchangeBuffers(capacities, expert_rows, d_node, d_rank)
