"""Dispatch/combine row operations as Pallas TPU kernels: row gathers driven by scalar-prefetched indices, one DMA per
row into double-buffered VMEM. Same math as `reference`; runs in interpret mode (interpret=True) on CPU.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cost import cost_estimate, nbytes
from pallas_kernels.dispatch import reference
from pallas_kernels.fp8.quantize import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, TILE

BLOCK_ROWS = 64      # output rows per grid step (gather, combine backward)
BLOCK_TOKENS = 16    # tokens per grid step (combine: K rows each)


_LOG = logging.getLogger(__name__)
_HALF_WORD = 16


def _block(n: int, preferred: int) -> int:
    return n if n <= preferred else preferred


@functools.cache
def _log_fallback(op: str, dtype) -> None:
    _LOG.warning("dispatch tpu %s: %s rows cannot be DMA'd row by row on TPU (32-bit and bfloat16 tables only); "
                 "using the reference", op, dtype)


def _kernel_dtype(op: str, dtype) -> bool:
    """True if the kernels gather rows of `dtype`; else logs (once per op and dtype) the fall-back to the reference."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 4 or dtype == jnp.bfloat16:
        return True
    _log_fallback(op, dtype.name)
    return False


def _word_table(table_XD):
    """The table as the kernels DMA it: 32-bit dtypes as they are; bfloat16 as uint32 words [rows, w] with w = D
    rounded up to 256, halved, and word j = bits of column j | bits of column j + w << 16 (zero columns pad D).

    TPU DMAs land single rows only in 32-bit VMEM arrays (a packed bf16 row at an odd sublane is not addressable),
    so bfloat16 tables travel as these words and are unpacked exactly in the kernel (`_unpacked`); other 16- and
    8-bit tables fall back to the reference (`_kernel_dtype`, logged once)."""
    if table_XD.dtype.itemsize == 4:
        return table_XD
    D = table_XD.shape[1]
    w = pl.cdiv(D, 2 * TILE) * TILE
    bits = lax.bitcast_convert_type(jnp.pad(table_XD, ((0, 0), (0, 2 * w - D))), jnp.uint16).astype(jnp.uint32)
    return bits[:, :w] | (bits[:, w:] << _HALF_WORD)


def _unpacked(words, d: int):
    """float32 [rows, d] of gathered rows: `words` as they are, or bfloat16 pairs unpacked (exact)."""
    if words.dtype != jnp.uint32:
        return words.astype(jnp.float32)
    low = lax.bitcast_convert_type(words << _HALF_WORD, jnp.float32)
    high = lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.concatenate([low, high], axis=1)[:, :d]


def _padded_indices(idx, block: int):
    """Indices padded with -1 (a zero row) to whole blocks, so SMEM reads of the last block stay in bounds."""
    n = idx.shape[0]
    return jnp.pad(idx.astype(jnp.int32), (0, pl.cdiv(n, block) * block - n), constant_values=-1)


def _row_copies(idx_ref, table_hbm, buf, sem, block, slot, n_idx: int, limit: int, start: bool):
    """Start (or wait for) the DMAs table[idx[block·n_idx + r]] -> buf[slot, r] for the block's n_idx rows."""
    def body(r, carry):
        i = idx_ref[block * n_idx + r]
        valid = (i >= 0) & (i < limit)
        copy = pltpu.make_async_copy(table_hbm.at[pl.ds(jnp.where(valid, i, 0), 1)],
                                     buf.at[slot, pl.ds(r, 1)], sem.at[slot])
        if start:
            pl.when(valid)(copy.start)

            @pl.when(jnp.logical_not(valid))
            def _zero():
                buf[slot, pl.ds(r, 1)] = jnp.zeros((1, buf.shape[-1]), buf.dtype)
        else:
            pl.when(valid)(copy.wait)
        return carry
    lax.fori_loop(0, n_idx, body, 0)


def _gathered(idx_ref, table_hbm, buf, sem, n_idx: int, limit: int):
    """This step's gathered rows (a [n_idx, D] view of the current slot), prefetching the next step's rows.

    Each grid step owns a block of output rows. The row indices live in SMEM (scalar prefetch); the step issues one
    DMA per row from the HBM table into a VMEM slot, and while it computes on its rows the DMAs of the next block
    are already in flight (two slots, so the grid runs in order: "arbitrary"). Rows whose index is out of range are
    zero-filled instead of copied."""
    i, steps = pl.program_id(0), pl.num_programs(0)
    copies = functools.partial(_row_copies, idx_ref, table_hbm, buf, sem, n_idx=n_idx, limit=limit)

    @pl.when(i == 0)
    def _first():
        copies(0, 0, start=True)

    @pl.when(i + 1 < steps)
    def _next():
        copies(i + 1, (i + 1) % 2, start=True)

    slot = i % 2
    copies(i, slot, start=False)
    return buf.at[slot]


def _quantize_into(rows_f32, xq_ref, scale_ref, power_of_two: bool):
    d = rows_f32.shape[1]
    for j in range(pl.cdiv(d, TILE)):
        cols = slice(j * TILE, min(d, (j + 1) * TILE))
        tile = rows_f32[:, cols]
        amax = jnp.max(jnp.abs(tile), axis=1, keepdims=True)
        scale = jnp.maximum(amax, jnp.float32(AMAX_FLOOR)) / jnp.float32(FP8_MAX)
        if power_of_two:   # round a normal positive float up to 2^e: carry any mantissa bit into the exponent
            bits = lax.bitcast_convert_type(scale, jnp.int32)
            scale = lax.bitcast_convert_type((bits + 0x7FFFFF) & jnp.int32(-0x800000), jnp.float32)
        xq_ref[:, cols] = jnp.clip(tile / scale, -FP8_MAX, FP8_MAX).astype(xq_ref.dtype)
        scale_ref[:, j:j + 1] = scale


def _gather_kernel(src_ref, x_hbm, out_ref, *rest, bm: int, limit: int, quantize: bool, power_of_two: bool):
    if quantize:
        xq_ref, scale_ref, buf, sem = rest
    else:
        buf, sem = rest
    rows = _unpacked(_gathered(src_ref, x_hbm, buf, sem, bm, limit)[...], out_ref.shape[1])
    out_ref[...] = rows.astype(out_ref.dtype)
    if quantize:
        _quantize_into(rows, xq_ref, scale_ref, power_of_two)


@functools.partial(jax.jit, static_argnames=("quantize", "power_of_two", "interpret", "block_rows"))
def gather_rows(x_TD, src_N, *, quantize: bool = False, power_of_two: bool = False, interpret=False,
                block_rows: int = BLOCK_ROWS):
    """Rows x_TD[src_N], copied (and, with `quantize`, fused E4M3 1×128 quantization: amax, scale, clip, cast per 128
    columns)."""
    if not _kernel_dtype("gather_rows", x_TD.dtype):
        return reference.gather_rows(x_TD, src_N, quantize=quantize, power_of_two=power_of_two)
    (T, D), N = x_TD.shape, src_N.shape[0]
    bm = _block(N, block_rows)
    src = _padded_indices(src_N, bm)
    words = _word_table(x_TD)
    row_block = pl.BlockSpec((bm, D), lambda i, src: (i, 0))
    out_shape = [jax.ShapeDtypeStruct((N, D), x_TD.dtype)]
    out_specs = [row_block]
    if quantize:
        Db = pl.cdiv(D, TILE)
        out_shape += [jax.ShapeDtypeStruct((N, D), FP8_DTYPE), jax.ShapeDtypeStruct((N, Db), jnp.float32)]
        out_specs += [row_block, pl.BlockSpec((bm, Db), lambda i, src: (i, 0))]
    outs = pl.pallas_call(
        functools.partial(_gather_kernel, bm=bm, limit=T, quantize=quantize, power_of_two=power_of_two),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(pl.cdiv(N, bm),),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((2, bm, words.shape[1]), words.dtype), pltpu.SemaphoreType.DMA((2,))]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        cost_estimate=cost_estimate(flops=(6 if quantize else 0) * N * D, bytes_accessed=nbytes(
            src, *[jax.ShapeDtypeStruct((N,) + words.shape[1:], words.dtype)], *out_shape)),
        interpret=interpret,
    )(src, words)
    return (outs[0], outs[1], outs[2]) if quantize else (outs[0], None, None)


def _combine_kernel(row_ref, y_hbm, *rest, bt: int, k: int, limit: int, weighted: bool):
    if weighted:
        w_ref, out_ref, buf, sem = rest
    else:
        out_ref, buf, sem = rest
    rows = _gathered(row_ref, y_hbm, buf, sem, bt * k, limit)   # row c·bt + t holds (token t, choice c)
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for c in range(k):
        y_c = _unpacked(rows[pl.ds(c * bt, bt)], out_ref.shape[1])
        acc = acc + (y_c * w_ref[:, c:c + 1].astype(jnp.float32) if weighted else y_c)
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "block_tokens"))
def combine_rows(y_ND, row_TK, weights_TK, out_dtype, *, interpret=False, block_tokens: int = BLOCK_TOKENS):
    """K rows per token, weighted and summed in float32."""
    if not _kernel_dtype("combine_rows", y_ND.dtype):
        return reference.combine_rows(y_ND, row_TK, weights_TK, out_dtype)
    (N, D), (T, K) = y_ND.shape, row_TK.shape
    bt = _block(T, block_tokens)
    steps = pl.cdiv(T, bt)
    # Per block of bt tokens, its K·bt row indices choice-major, so choice c's rows are one contiguous slab.
    rows_TK = jnp.pad(row_TK.astype(jnp.int32), ((0, steps * bt - T), (0, 0)), constant_values=-1)
    rows = rows_TK.reshape(steps, bt, K).transpose(0, 2, 1).reshape(-1)
    weighted = weights_TK is not None
    in_specs = [pl.BlockSpec(memory_space=pl.ANY)]
    words = _word_table(y_ND)
    args = [rows, words]
    if weighted:
        in_specs.append(pl.BlockSpec((bt, K), lambda i, rows: (i, 0)))
        args.append(weights_TK.astype(jnp.float32))
    return pl.pallas_call(
        functools.partial(_combine_kernel, bt=bt, k=K, limit=N, weighted=weighted),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(steps,), in_specs=in_specs,
            out_specs=pl.BlockSpec((bt, D), lambda i, rows: (i, 0)),
            scratch_shapes=[pltpu.VMEM((2, bt * K, words.shape[1]), words.dtype), pltpu.SemaphoreType.DMA((2,))]),
        out_shape=jax.ShapeDtypeStruct((T, D), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        cost_estimate=cost_estimate(flops=(2 if weighted else 1) * T * K * D, bytes_accessed=nbytes(
            *args[:1], jax.ShapeDtypeStruct((T * K, words.shape[1]), words.dtype), *args[2:],
            jax.ShapeDtypeStruct((T, D), out_dtype))),
        interpret=interpret,
    )(*args)


def _combine_grad_kernel(src_ref, dout_hbm, y_ref, w_ref, dy_ref, dw_ref, buf, sem, *, bm: int, limit: int):
    g = _unpacked(_gathered(src_ref, dout_hbm, buf, sem, bm, limit)[...], dy_ref.shape[1])
    dy_ref[...] = (g * w_ref[...]).astype(dy_ref.dtype)
    dw_ref[...] = jnp.sum(y_ref[...].astype(jnp.float32) * g, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows"))
def combine_rows_grad(y_ND, dout_TD, src_N, w_N, *, interpret=False, block_rows: int = BLOCK_ROWS):
    """dy = w · dout[src], dw = <y, dout[src]> per row."""
    if not _kernel_dtype("combine_rows_grad", dout_TD.dtype):
        return reference.combine_rows_grad(y_ND, dout_TD, src_N, w_N)
    (N, D), T = y_ND.shape, dout_TD.shape[0]
    bm = _block(N, block_rows)
    src = _padded_indices(src_N, bm)
    words = _word_table(dout_TD)
    w_N1 = w_N.astype(jnp.float32)[:, None]
    out_shape = [jax.ShapeDtypeStruct((N, D), y_ND.dtype), jax.ShapeDtypeStruct((N, 1), jnp.float32)]
    row_block = pl.BlockSpec((bm, D), lambda i, src: (i, 0))
    col_block = pl.BlockSpec((bm, 1), lambda i, src: (i, 0))
    dy_ND, dw_N1 = pl.pallas_call(
        functools.partial(_combine_grad_kernel, bm=bm, limit=T),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(pl.cdiv(N, bm),),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY), row_block, col_block],
            out_specs=[row_block, col_block],
            scratch_shapes=[pltpu.VMEM((2, bm, words.shape[1]), words.dtype), pltpu.SemaphoreType.DMA((2,))]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        cost_estimate=cost_estimate(flops=3 * N * D, bytes_accessed=nbytes(
            src, jax.ShapeDtypeStruct((N, words.shape[1]), words.dtype), y_ND, w_N1, *out_shape)),
        interpret=interpret,
    )(src, words, y_ND, w_N1)
    return dy_ND, dw_N1[:, 0]
