"""Losses: next-token and MTP cross-entropy that never cross a packed-document boundary (segment id 0 is padding), the
sequence-wise balance loss and an optional z-loss. The cross-entropy takes the head's inputs, not logits, so training
never holds [B, T, V] float32 logits (`head_cross_entropy`; the train step and the pipeline's last stage use it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
    vocab_chunk: int = 8192            # head columns whose logits exist at once, every position (0: use logits_chunk)


def shifted_targets(tokens_BT, segment_ids_BT, offset: int):
    """Targets tokens[i + offset] and a mask that is True where they exist in the same segment as i (a target is
    valid only when it lies in the same segment as the input position it is predicted from; segment 0 is padding)."""
    targets_BT = jnp.pad(tokens_BT[:, offset:], ((0, 0), (0, offset)))
    return targets_BT, same_segment(segment_ids_BT, offset, tokens_BT.shape)


def head_cross_entropy(logits_fn: Callable, w_DV, x_BTD, targets_BT, weights_BT, chunk: int, w_dtype=None,
                       vocab_chunk: int = 0):
    """(Σ w·(logsumexp − target logit), Σ w·logsumexp²) over every position, float32, where the logits are
    logits_fn(w_DV, x) for `chunk` positions of every row at a time (chunk <= 0: all T at once), or, with
    `vocab_chunk` > 0, for every position and `vocab_chunk` columns of the head at a time (_vocab_chunked_sums: no
    weight gradient is summed over chunks).

    `w_dtype`: the dtype logits_fn multiplies w_DV in (the model's compute dtype; None: w_DV's own). w_DV is cast to
    it once, not per chunk, and its gradient is summed over chunks in w_DV's dtype (float32 for float32 weights).
    The backward pass recomputes each chunk's [B, chunk, V] logits from the saved log-sum-exps (_chunked_sums)."""
    w_dtype = jnp.dtype(w_dtype or w_DV.dtype)
    if vocab_chunk > 0:
        return _vocab_chunked_sums(logits_fn, w_dtype, min(vocab_chunk, w_DV.shape[-1]), w_DV, x_BTD, targets_BT,
                                   weights_BT.astype(jnp.float32))
    B, T, _ = x_BTD.shape
    chunk = T if chunk <= 0 else min(chunk, T)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        pad_seq = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        x_BTD, targets_BT, weights_BT = pad_seq(x_BTD), pad_seq(targets_BT), pad_seq(weights_BT)   # weight 0
    chunks = lambda a: a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)
    return _chunked_sums(logits_fn, w_dtype, w_DV, chunks(x_BTD), chunks(targets_BT),
                         chunks(weights_BT).astype(jnp.float32))


def _chunk_logits(logits_fn, w_DV, x_BtD, targets_Bt):
    """A chunk's float32 logits, log-sum-exps and target logits."""
    logits_BtV = logits_fn(w_DV, x_BtD).astype(jnp.float32)
    lse_Bt = jax.nn.logsumexp(logits_BtV, axis=-1)
    return logits_BtV, lse_Bt, jnp.take_along_axis(logits_BtV, targets_Bt[..., None], axis=-1)[..., 0]


def _d_logits(logits, lse, onehot, weights, g_ce, g_z):
    """The cotangent of a chunk's float32 logits [..., V] from those of the two sums (g_ce, g_z): weight · (g_ce ·
    (softmax − onehot) + g_z · 2 · lse · softmax); lse and weights are [...]."""
    p = jnp.exp(logits - lse[..., None])
    return weights[..., None] * (g_ce * (p - onehot) + (g_z * 2.0) * lse[..., None] * p)


def _weights_gradient(lse, target_logit, g_ce, g_z):
    """The sums' gradient with respect to each position's weight."""
    return g_ce * (lse - target_logit) + g_z * lse**2


def _sums_forward(logits_fn, w_dtype, w_DV, x_NBtD, targets_NBt, weights_NBt):
    w_cast = w_DV.astype(w_dtype)

    def step(total, xs):
        x_BtD, targets_Bt, weights_Bt = xs
        _, lse_Bt, target_logit_Bt = _chunk_logits(logits_fn, w_cast, x_BtD, targets_Bt)
        total = (total[0] + ((lse_Bt - target_logit_Bt) * weights_Bt).sum(), total[1] + (lse_Bt**2 * weights_Bt).sum())
        return total, (lse_Bt, target_logit_Bt)

    zero = jnp.zeros((), jnp.float32)
    total, (lse_NBt, target_logit_NBt) = jax.lax.scan(step, (zero, zero), (x_NBtD, targets_NBt, weights_NBt))
    return total, (w_cast, x_NBtD, targets_NBt, weights_NBt, lse_NBt, target_logit_NBt, jnp.zeros((), w_DV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_sums(logits_fn, w_dtype, w_DV, x_NBtD, targets_NBt, weights_NBt):
    """head_cross_entropy's sums over chunks (leading axis N); its backward, chunk by chunk, recomputes the logits,
    forms their cotangent (_d_logits) and pulls it back through logits_fn, adding the chunks' weight gradients in
    w_DV's dtype."""
    return _sums_forward(logits_fn, w_dtype, w_DV, x_NBtD, targets_NBt, weights_NBt)[0]


def _sums_backward(logits_fn, w_dtype, saved, g):
    w_cast, x_NBtD, targets_NBt, weights_NBt, lse_NBt, target_logit_NBt, w_like = saved
    g_ce, g_z = g

    def step(g_w_DV, xs):
        x_BtD, targets_Bt, weights_Bt, lse_Bt = xs
        logits_BtV, vjp = jax.vjp(lambda w, x: logits_fn(w, x).astype(jnp.float32), w_cast, x_BtD)
        onehot_BtV = jax.nn.one_hot(targets_Bt, logits_BtV.shape[-1], dtype=jnp.float32)
        g_w_chunk, g_x_BtD = vjp(_d_logits(logits_BtV, lse_Bt, onehot_BtV, weights_Bt, g_ce, g_z))
        return g_w_DV + g_w_chunk.astype(g_w_DV.dtype), g_x_BtD

    g_w_DV, g_x_NBtD = jax.lax.scan(step, jnp.zeros(w_cast.shape, w_like.dtype),
                                    (x_NBtD, targets_NBt, weights_NBt, lse_NBt))
    g_targets = np.zeros(targets_NBt.shape, jax.dtypes.float0)
    return g_w_DV, g_x_NBtD, g_targets, _weights_gradient(lse_NBt, target_logit_NBt, g_ce, g_z)


_chunked_sums.defvjp(_sums_forward, _sums_backward)


def _column_chunks(w_dtype, vocab_chunk: int, w_DV):
    """w_DV cast to w_dtype as [N, D, vocab_chunk] column chunks (zero columns pad the last) and the valid-column
    mask [N, vocab_chunk]."""
    D, V = w_DV.shape
    n = -(-V // vocab_chunk)
    w_DV = jnp.pad(w_DV.astype(w_dtype), ((0, 0), (0, n * vocab_chunk - V)))
    valid_NC = (jnp.arange(n * vocab_chunk) < V).reshape(n, vocab_chunk)
    return w_DV.reshape(D, n, vocab_chunk).swapaxes(0, 1), valid_NC


def _vocab_forward(logits_fn, w_dtype, vocab_chunk, w_DV, x_BTD, targets_BT, weights_BT):
    w_NDC, valid_NC = _column_chunks(w_dtype, vocab_chunk, w_DV)

    def step(carry, xs):
        max_BT, sum_BT, target_logit_BT = carry
        w_DC, valid_C, first = xs
        logits_BTC = jnp.where(valid_C, logits_fn(w_DC, x_BTD).astype(jnp.float32), -jnp.inf)
        new_max_BT = jnp.maximum(max_BT, logits_BTC.max(axis=-1))
        sum_BT = sum_BT * jnp.exp(max_BT - new_max_BT) + jnp.exp(logits_BTC - new_max_BT[..., None]).sum(axis=-1)
        mine_BTC = (targets_BT - first)[..., None] == jnp.arange(vocab_chunk)
        target_logit_BT = target_logit_BT + jnp.where(mine_BTC, logits_BTC, 0.0).sum(axis=-1)
        return (new_max_BT, sum_BT, target_logit_BT), None

    shape = targets_BT.shape
    start = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    firsts = jnp.arange(w_NDC.shape[0]) * vocab_chunk
    (max_BT, sum_BT, target_logit_BT), _ = jax.lax.scan(step, start, (w_NDC, valid_NC, firsts))
    lse_BT = max_BT + jnp.log(sum_BT)
    total = ((lse_BT - target_logit_BT) * weights_BT).sum(), (lse_BT**2 * weights_BT).sum()
    return total, (w_NDC, valid_NC, x_BTD, targets_BT, weights_BT, lse_BT, target_logit_BT,
                   jnp.zeros((w_DV.shape[1], 0), w_DV.dtype))   # carries w_DV's width and dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _vocab_chunked_sums(logits_fn, w_dtype, vocab_chunk, w_DV, x_BTD, targets_BT, weights_BT):
    """head_cross_entropy's sums with every position's logits made `vocab_chunk` columns at a time (an online
    log-sum-exp). The backward, per column chunk, recomputes its logits, forms their cotangent (_d_logits) in w_dtype
    and multiplies it out itself (logits_fn must be x · w in w_dtype, whatever the rounding of its result): the
    chunk's weight gradient (float32 accumulation, written once) and its share of x's gradient (summed over chunks
    in float32)."""
    return _vocab_forward(logits_fn, w_dtype, vocab_chunk, w_DV, x_BTD, targets_BT, weights_BT)[0]


def _vocab_backward(logits_fn, w_dtype, vocab_chunk, saved, g):
    w_NDC, valid_NC, x_BTD, targets_BT, weights_BT, lse_BT, target_logit_BT, w_like = saved
    g_ce, g_z = g
    x_cast = x_BTD.astype(w_dtype)

    def step(g_x_BTD, xs):
        w_DC, valid_C, first = xs
        logits_BTC = jnp.where(valid_C, logits_fn(w_DC, x_BTD).astype(jnp.float32), -jnp.inf)
        onehot_BTC = ((targets_BT - first)[..., None] == jnp.arange(vocab_chunk)).astype(jnp.float32)
        d_BTC = _d_logits(logits_BTC, lse_BT, onehot_BTC, weights_BT, g_ce, g_z).astype(w_dtype)
        g_w_DC = jnp.einsum("btd,btc->dc", x_cast, d_BTC, preferred_element_type=jnp.float32)
        g_x_BTD = g_x_BTD + jnp.einsum("btc,dc->btd", d_BTC, w_DC, preferred_element_type=jnp.float32)
        return g_x_BTD, g_w_DC

    firsts = jnp.arange(w_NDC.shape[0]) * vocab_chunk
    g_x_BTD, g_w_NDC = jax.lax.scan(step, jnp.zeros(x_BTD.shape, jnp.float32), (w_NDC, valid_NC, firsts))
    g_w_DV = g_w_NDC.swapaxes(0, 1).reshape(w_NDC.shape[1], -1)[:, :w_like.shape[0]].astype(w_like.dtype)
    return (g_w_DV, g_x_BTD.astype(x_BTD.dtype), np.zeros(targets_BT.shape, jax.dtypes.float0),
            _weights_gradient(lse_BT, target_logit_BT, g_ce, g_z))


_vocab_chunked_sums.defvjp(_vocab_forward, _vocab_backward)


def valid_targets(tokens_BT, segment_ids_BT, n_offsets: int):
    """bool [n_offsets, B, T]: where targets exist at offsets 1, 2, ... (next token, MTP depths): shifted_targets."""
    return jnp.stack([shifted_targets(tokens_BT, segment_ids_BT, offset)[1] for offset in range(1, n_offsets + 1)])


def target_counts(tokens_BT, segment_ids_BT, n_offsets: int):
    """float32 [n_offsets]: how many valid targets the rows hold at offsets 1, 2, ... (next token, MTP depths)."""
    return valid_targets(tokens_BT, segment_ids_BT, n_offsets).sum(axis=(1, 2)).astype(jnp.float32)


def prediction_loss(logits_fn: Callable, w_DV, head_in_BTD, mtp_head_in_ZBTD, tokens_BT, weights_OBT, norm_O,
                    balance, mtp_weight, balance_alpha: float, z_loss: float, chunk: int, w_dtype=None,
                    vocab_chunk: int = 0):
    """CE + z·Z + λ·mean_d CE_d + α·balance, and its parts {"ce", "mtp_ce" (with MTP), "balance"}: the loss of the
    train step (total_loss) and of the pipeline's last stage (train.stages), which differ only in their weights.

    The cross-entropy at offset o (1: the next token, d + 2: MTP depth d, from mtp_head_in_ZBTD[d]) and its z-loss Z
    are head_cross_entropy's sums with targets tokens[t + o] and weights weights_OBT[o − 1], divided by
    norm_O[o − 1]; `w_dtype` (the dtype the head multiplies w_DV in), `chunk` and `vocab_chunk`: head_cross_entropy."""
    def cross_entropy(x_BTD, offset):
        targets_BT = shifted_targets(tokens_BT, None, offset)[0]
        ce_sum, z_sum = head_cross_entropy(logits_fn, w_DV, x_BTD, targets_BT, weights_OBT[offset - 1], chunk,
                                           w_dtype, vocab_chunk)
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
               counts_O=None, balance_weight: float = 1.0, w_dtype=None, vocab_chunk: int = 0):
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
                                    balance_alpha, z_loss, chunk, w_dtype, vocab_chunk)
    return loss, dict(metrics, tokens=valid_OBT[0].sum(), loss=loss)
