"""DeepSeekMoE routing: scores, selection bias, group-limited top-k, weights, balance statistics."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig

BIAS_COLLECTION = "moe_bias"


class Routing(NamedTuple):
    weights_TK: jnp.ndarray   # float32 combine weights
    experts_TK: jnp.ndarray   # int32 expert ids
    scores_TE: jnp.ndarray    # float32 unbiased scores


class RouterStats(NamedTuple):
    expert_counts_E: jnp.ndarray   # tokens sent to each expert (float32)
    balance_loss: jnp.ndarray      # sequence-wise balance loss, before its α


def route(logits_TE, bias_E, config: ModelConfig) -> Routing:
    """The experts and combine weights of every token:

        s    = sigmoid(x W) or softmax(x W)          (float32)
        sel  = s + b                                  (b: e_score_correction_bias, selection only)
        groups scored (top-2 sum of sel, or max), all but `topk_group` groups masked to -inf
        idx  = top_k(sel, k);  w = s[idx] (/ sum when norm_topk_prob) · routed_scaling_factor
    """
    c = config
    logits_TE = logits_TE.astype(jnp.float32)
    scores_TE = jax.nn.sigmoid(logits_TE) if c.scoring_func == "sigmoid" else jax.nn.softmax(logits_TE, axis=-1)
    select_TE = scores_TE + bias_E.astype(jnp.float32)
    if c.topk_method != "greedy" and c.n_group > 1:
        T, E = select_TE.shape
        grouped_TGe = select_TE.reshape(T, c.n_group, E // c.n_group)
        if c.topk_method == "noaux_tc":
            group_score_TG = jax.lax.top_k(grouped_TGe, 2)[0].sum(axis=-1)
        else:
            group_score_TG = grouped_TGe.max(axis=-1)
        kept_TG = jax.lax.top_k(group_score_TG, c.topk_group)[1]
        keep_TG = jnp.zeros_like(group_score_TG, dtype=bool).at[jnp.arange(T)[:, None], kept_TG].set(True)
        select_TE = jnp.where(keep_TG[:, :, None], grouped_TGe, -jnp.inf).reshape(T, E)
    experts_TK = jax.lax.top_k(select_TE, c.num_experts_per_tok)[1].astype(jnp.int32)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if c.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(axis=-1, keepdims=True) + 1e-20)
    return Routing(weights_TK * c.routed_scaling_factor, experts_TK, scores_TE)


def router_stats(routing: Routing, batch: int, n_experts: int, counted_BT=None) -> RouterStats:
    """Per-expert token counts, and DeepSeek-V3's sequence-wise balance loss L = Σ_i f_i P_i averaged over the batch's
    rows.

    Only tokens where `counted_BT` is True (default: all) enter either: padding stays out of the bias update's
    counts and of the balance loss. A row's f and P are over its counted tokens T_b (f_i = E/(K·T_b) Σ_t 1[i ∈
    topk(t)], P_i = 1/T_b Σ_t s_ti / Σ_j s_tj, the scores normalised per token); the mean is over all `batch` rows,
    a row with no counted token adding 0, so that the means of equal-sized micro-batches average to the whole batch's.
    """
    T_all, K = routing.experts_TK.shape
    seq = T_all // batch
    experts_BTK = routing.experts_TK.reshape(batch, seq, K)
    counted_BT = jnp.ones((batch, seq), bool) if counted_BT is None else counted_BT.reshape(batch, seq)
    dropped_BTK = jnp.where(counted_BT[..., None], experts_BTK, n_experts)   # uncounted tokens go to bin E
    counts_E = jnp.bincount(dropped_BTK.reshape(-1), length=n_experts + 1)[:n_experts].astype(jnp.float32)
    w_BT = counted_BT.astype(jnp.float32)
    tokens_B1 = jnp.maximum(w_BT.sum(axis=1), 1.0)[:, None]
    chosen_BTE = jax.nn.one_hot(experts_BTK, n_experts, dtype=jnp.float32).sum(2) * w_BT[..., None]
    f_BE = chosen_BTE.sum(axis=1) * (n_experts / K) / tokens_B1
    probs_BTE = routing.scores_TE.reshape(batch, seq, n_experts)
    shares_BTE = probs_BTE / probs_BTE.sum(axis=-1, keepdims=True) * w_BT[..., None]
    p_BE = shares_BTE.sum(axis=1) / tokens_B1
    return RouterStats(counts_E, jnp.mean(jnp.sum(f_BE * p_BE, axis=-1)))


class Router(nn.Module):
    """Gate weights (a parameter) and the correction bias (float32, in the `moe_bias` collection)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_TD) -> Routing:
        c = self.config
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range),
                                                                   ("embed", "router")),
                            (x_TD.shape[-1], c.n_routed_experts), c.jnp_param_dtype)
        bias = self.variable(BIAS_COLLECTION, "bias", jnp.zeros, (c.n_routed_experts,), jnp.float32)
        logits_TE = jnp.dot(x_TD.astype(jnp.float32), kernel.astype(jnp.float32))
        return route(logits_TE, jax.lax.stop_gradient(bias.value), c)
