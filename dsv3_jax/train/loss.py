"""Losses: next-token and MTP cross-entropy that never cross a packed-document boundary, the
sequence-wise balance loss, and an optional z-loss.

Segment id 0 marks padding; a target is valid only when it lies in the same segment as the input
position it is predicted from.
"""

from __future__ import annotations

import dataclasses

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


def shifted_targets(tokens_BT, segment_ids_BT, offset: int):
    """Targets tokens[i + offset] and a mask that is True where they exist in the same segment as i."""
    B, T = tokens_BT.shape
    targets_BT = jnp.pad(tokens_BT[:, offset:], ((0, 0), (0, offset)))
    valid_BT = jnp.arange(T)[None, :] < T - offset
    if segment_ids_BT is not None:
        later_BT = jnp.pad(segment_ids_BT[:, offset:], ((0, 0), (0, offset)))
        valid_BT = valid_BT & (later_BT == segment_ids_BT) & (segment_ids_BT != 0)
    return targets_BT, jnp.broadcast_to(valid_BT, (B, T))


def cross_entropy(logits_BTV, targets_BT, valid_BT):
    """(mean CE over valid positions, mean logsumexp² over valid positions, valid count)."""
    logits = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    w = valid_BT.astype(jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)
    return ((lse_BT - target_logit_BT) * w).sum() / count, (lse_BT**2 * w).sum() / count, w.sum()


def total_loss(outputs: ModelOutputs, tokens_BT, segment_ids_BT, mtp_weight, balance_alpha: float,
               z_loss: float = 0.0):
    """Scalar loss and a dict of its parts (all float32 scalars)."""
    targets, valid = shifted_targets(tokens_BT, segment_ids_BT, 1)
    ce, z, n_tokens = cross_entropy(outputs.logits_BTV, targets, valid)
    loss = ce + z_loss * z
    metrics = {"ce": ce, "tokens": n_tokens}
    if outputs.mtp_logits_DBTV is not None:
        depth = outputs.mtp_logits_DBTV.shape[0]
        mtp_ce = []
        for d in range(depth):
            t, v = shifted_targets(tokens_BT, segment_ids_BT, d + 2)
            mtp_ce.append(cross_entropy(outputs.mtp_logits_DBTV[d], t, v)[0])
        mtp = jnp.mean(jnp.stack(mtp_ce))
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
