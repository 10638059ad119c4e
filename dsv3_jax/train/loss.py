"""Losses: next-token and MTP cross-entropy that never cross a packed-document boundary, the
sequence-wise balance loss, and an optional z-loss.

Segment id 0 marks padding; a target is valid only when it lies in the same segment as the input
position it is predicted from. The cross-entropy takes the head's inputs, not logits: `head_cross_entropy` applies
the head to `logits_chunk` positions of every row at a time and recomputes them in the backward pass, so training
never holds [B, T, V] float32 logits (the train step and the pipeline's last stage both go through it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from dsv3_jax.model import ModelOutputs


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """L = CE + λ/D Σ_d CE_d + α Σ_layers L_balance + z · mean(logsumexp²)."""
    mtp_weight: float = 0.3            # λ
    mtp_weight_after: float = 0.1      # λ from `mtp_switch_after` on (DeepSeek: 0.3 for 10T tokens, then 0.1)
    mtp_switch_after: float = -1       # in `mtp_switch_unit`; -1: never switch
    mtp_switch_unit: str = "tokens"
    balance_alpha: float = 1e-4        # α
    z_loss: float = 0.0
    logits_chunk: int = 256            # positions per row whose logits exist at once (0: the whole sequence)


def shifted_targets(tokens_BT, segment_ids_BT, offset: int):
    """Targets tokens[i + offset] and a mask that is True where they exist in the same segment as i."""
    B, T = tokens_BT.shape
    targets_BT = jnp.pad(tokens_BT[:, offset:], ((0, 0), (0, offset)))
    valid_BT = jnp.arange(T)[None, :] < T - offset
    if segment_ids_BT is not None:
        later_BT = jnp.pad(segment_ids_BT[:, offset:], ((0, 0), (0, offset)))
        valid_BT = valid_BT & (later_BT == segment_ids_BT) & (segment_ids_BT != 0)
    return targets_BT, jnp.broadcast_to(valid_BT, (B, T))


def head_cross_entropy(logits_fn: Callable, w_DV, x_BTD, targets_BT, weights_BT, chunk: int):
    """(Σ w·(logsumexp − target logit), Σ w·logsumexp²) over every position, float32, where the logits are
    logits_fn(w_DV, x) for `chunk` positions of every row at a time (chunk <= 0: all T at once).

    Each chunk's head matmul, log-sum-exp and target gather run under jax.checkpoint inside a scan: the backward
    pass recomputes that chunk's [B, chunk, V] logits instead of keeping all of them."""
    B, T, _ = x_BTD.shape
    chunk = T if chunk <= 0 else min(chunk, T)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        pad_seq = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        x_BTD, targets_BT, weights_BT = pad_seq(x_BTD), pad_seq(targets_BT), pad_seq(weights_BT)   # weight 0

    @jax.checkpoint
    def sums(w_DV, x_BcD, targets_Bc, weights_Bc):
        logits_BcV = logits_fn(w_DV, x_BcD).astype(jnp.float32)
        lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        target_logit_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
        w = weights_Bc.astype(jnp.float32)
        return ((lse_Bc - target_logit_Bc) * w).sum(), (lse_Bc**2 * w).sum()

    if n == 1:
        return sums(w_DV, x_BTD, targets_BT, weights_BT)
    chunks = lambda a: a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    def step(total, xs):
        ce, z = sums(w_DV, *xs)
        return (total[0] + ce, total[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    total, _ = jax.lax.scan(step, (zero, zero), (chunks(x_BTD), chunks(targets_BT), chunks(weights_BT)))
    return total


def total_loss(outputs: ModelOutputs, logits_fn: Callable, w_DV, tokens_BT, segment_ids_BT, mtp_weight,
               balance_alpha: float, z_loss: float = 0.0, chunk: int = LossConfig.logits_chunk):
    """Scalar loss and a dict of its parts (all float32 scalars). `outputs` carry the head's inputs (the model
    applied with logits=False); logits_fn(w_DV, x) is the head (model.head_logits on model.head_weight)."""
    def mean_ce(x_BTD, offset):
        targets, valid = shifted_targets(tokens_BT, segment_ids_BT, offset)
        w = valid.astype(jnp.float32)
        count = jnp.maximum(w.sum(), 1.0)
        ce_sum, z_sum = head_cross_entropy(logits_fn, w_DV, x_BTD, targets, w, chunk)
        return ce_sum / count, z_sum / count, w.sum()

    ce, z, n_tokens = mean_ce(outputs.head_in_BTD, 1)
    loss = ce + z_loss * z
    metrics = {"ce": ce, "tokens": n_tokens}
    if outputs.mtp_head_in_DBTD is not None:
        depth = outputs.mtp_head_in_DBTD.shape[0]
        mtp = jnp.mean(jnp.stack([mean_ce(outputs.mtp_head_in_DBTD[d], d + 2)[0] for d in range(depth)]))
        loss = loss + mtp_weight * mtp
        metrics["mtp_ce"] = mtp
    balance = 0.0
    for stats in (outputs.moe_stats, outputs.mtp_stats):
        if stats is not None:
            balance = balance + stats.balance_loss.sum()
    loss = loss + balance_alpha * balance
    metrics["balance"] = jnp.asarray(balance, jnp.float32)
    metrics["loss"] = loss
    return loss, metrics
