"""Losses: next-token and MTP cross-entropy that never cross a packed-document boundary (segment id 0 is padding), the
sequence-wise balance loss and an optional z-loss. The cross-entropy takes the head's inputs, not logits, so training
never holds [B, T, V] float32 logits (`head_cross_entropy`; the train step and the pipeline's last stage use it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from dsv3_jax.model import ModelOutputs
from dsv3_jax.model.segments import same_segment


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
    """Targets tokens[i + offset] and a mask that is True where they exist in the same segment as i (a target is
    valid only when it lies in the same segment as the input position it is predicted from; segment 0 is padding)."""
    targets_BT = jnp.pad(tokens_BT[:, offset:], ((0, 0), (0, offset)))
    return targets_BT, same_segment(segment_ids_BT, offset, tokens_BT.shape)


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
    def sums(w_DV, x_BtD, targets_Bt, weights_Bt):
        logits_BtV = logits_fn(w_DV, x_BtD).astype(jnp.float32)
        lse_Bt = jax.nn.logsumexp(logits_BtV, axis=-1)
        target_logit_Bt = jnp.take_along_axis(logits_BtV, targets_Bt[..., None], axis=-1)[..., 0]
        w = weights_Bt.astype(jnp.float32)
        return ((lse_Bt - target_logit_Bt) * w).sum(), (lse_Bt**2 * w).sum()

    if n == 1:
        return sums(w_DV, x_BTD, targets_BT, weights_BT)
    chunks = lambda a: a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    def step(total, xs):
        ce, z = sums(w_DV, *xs)
        return (total[0] + ce, total[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    total, _ = jax.lax.scan(step, (zero, zero), (chunks(x_BTD), chunks(targets_BT), chunks(weights_BT)))
    return total


def valid_targets(tokens_BT, segment_ids_BT, n_offsets: int):
    """bool [n_offsets, B, T]: where targets exist at offsets 1, 2, ... (next token, MTP depths): shifted_targets."""
    return jnp.stack([shifted_targets(tokens_BT, segment_ids_BT, offset)[1] for offset in range(1, n_offsets + 1)])


def target_counts(tokens_BT, segment_ids_BT, n_offsets: int):
    """float32 [n_offsets]: how many valid targets the rows hold at offsets 1, 2, ... (next token, MTP depths)."""
    return valid_targets(tokens_BT, segment_ids_BT, n_offsets).sum(axis=(1, 2)).astype(jnp.float32)


def prediction_loss(logits_fn: Callable, w_DV, head_in_BTD, mtp_head_in_ZBTD, tokens_BT, weights_OBT, norm_O,
                    balance, mtp_weight, balance_alpha: float, z_loss: float, chunk: int):
    """CE + z·Z + λ·mean_d CE_d + α·balance, and its parts {"ce", "mtp_ce" (with MTP), "balance"}: the loss of the
    train step (total_loss) and of the pipeline's last stage (train.stages), which differ only in their weights.

    The cross-entropy at offset o (1: the next token, d + 2: MTP depth d, from mtp_head_in_ZBTD[d]) and its z-loss Z
    are head_cross_entropy's sums with targets tokens[t + o] and weights weights_OBT[o − 1], divided by
    norm_O[o − 1]."""
    def cross_entropy(x_BTD, offset):
        targets_BT = shifted_targets(tokens_BT, None, offset)[0]
        ce_sum, z_sum = head_cross_entropy(logits_fn, w_DV, x_BTD, targets_BT, weights_OBT[offset - 1], chunk)
        return ce_sum / norm_O[offset - 1], z_sum / norm_O[offset - 1]

    ce, z = cross_entropy(head_in_BTD, 1)
    loss = ce + z_loss * z
    metrics = {"ce": ce}
    if mtp_head_in_ZBTD is not None:
        mtp = jnp.mean(jnp.stack([cross_entropy(mtp_head_in_ZBTD[d], d + 2)[0]
                                  for d in range(mtp_head_in_ZBTD.shape[0])]))
        loss = loss + mtp_weight * mtp
        metrics["mtp_ce"] = mtp
    metrics["balance"] = jnp.asarray(balance, jnp.float32)
    return loss + balance_alpha * balance, metrics


def total_loss(outputs: ModelOutputs, logits_fn: Callable, w_DV, tokens_BT, segment_ids_BT, mtp_weight,
               balance_alpha: float, z_loss: float = 0.0, chunk: int = LossConfig.logits_chunk,
               counts_O=None, balance_weight: float = 1.0):
    """Scalar loss and a dict of its parts (all float32 scalars). `outputs` carry the head's inputs (the model
    applied with logits=False); logits_fn(w_DV, x) is the head (model.head_logits on model.head_weight).

    Each cross-entropy (and the z-loss) is this batch's sum over valid targets divided by `counts_O[offset − 1]`:
    by default this batch's own counts (means); given one micro-batch of a step, the step's counts (target_counts
    over all its micro-batches), so that the micro-batches' losses and gradients add up to the step's means over
    all its tokens. `balance_weight` scales the balance term (1 / micro-batches: its means average over them).
    """
    depth = 0 if outputs.mtp_head_in_ZBTD is None else outputs.mtp_head_in_ZBTD.shape[0]
    valid_OBT = valid_targets(tokens_BT, segment_ids_BT, 1 + depth).astype(jnp.float32)
    if counts_O is None:
        counts_O = valid_OBT.sum(axis=(1, 2))
    balance = 0.0
    for stats in (outputs.moe_stats, outputs.mtp_stats):
        if stats is not None:
            balance = balance + stats.balance_loss.sum()
    loss, metrics = prediction_loss(logits_fn, w_DV, outputs.head_in_BTD, outputs.mtp_head_in_ZBTD, tokens_BT,
                                    valid_OBT, jnp.maximum(counts_O, 1.0), balance_weight * balance, mtp_weight,
                                    balance_alpha, z_loss, chunk)
    return loss, dict(metrics, tokens=valid_OBT[0].sum(), loss=loss)
