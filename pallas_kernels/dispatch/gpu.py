"""Dispatch/combine row operations as Pallas GPU kernels (Triton backend): masked pointer gathers of rows, a program per
tile of rows × 128 columns. Same math as `reference`; on CPU they run with interpret=True, and they lower for CUDA
from any host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.cost import cost_estimate, nbytes
from pallas_kernels.fp8.quantize import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, TILE

BLOCK_ROWS = 32      # rows per program (gather, combine backward)
BLOCK_TOKENS = 16    # tokens per program (combine: K tiles each)
NUM_WARPS = 4


def _block(n: int, preferred: int) -> int:
    """A power of two: `preferred`, or the smallest one covering n when n is smaller."""
    return min(preferred, pl.next_power_of_2(max(n, 1)))


def _rows(idx_ref, start, size: int, n_idx: int, limit: int):
    """size indices idx[start:start+size] (masked past n_idx) and which of them name a row in [0, limit)."""
    pos = start + jnp.arange(size)
    idx = plt.load(idx_ref.at[pl.ds(start, size)], mask=pos < n_idx, other=-1)
    valid = (idx >= 0) & (idx < limit)
    return jnp.where(valid, idx, 0), valid


def _tile(ref, rows, row_mask, col0, n_cols: int):
    """ref[rows, col0:col0+128] as a [len(rows), 128] tile; masked entries read as 0.

    Each program owns a tile of rows × 128 columns (the FP8 tile width); row indices are loaded as a vector and
    drive one masked gather of the tile, so any T, N, D work (tiles are powers of two, edges are masked, rows whose
    index is out of range read as 0)."""
    cols = col0 + jnp.arange(TILE)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    return plt.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0), mask, cols


def _div(a, b, ieee: bool):
    """a / b rounded to nearest like XLA's division. Triton's own fp32 `/` is the approximate div.full.f32, which
    would make the FP8 codes differ from `quantize_1x128` in the last bit now and then; interpret mode has no PTX."""
    if not ieee:
        return a / b
    a, b = jnp.broadcast_arrays(a, b)
    return plt.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


def _store_tile(ref, rows, cols, mask, value):
    plt.store(ref.at[rows[:, None], cols[None, :]], value.astype(ref.dtype), mask=mask)


def _gather_kernel(src_ref, x_ref, *out_refs, n: int, t: int, d: int, bm: int, quantize: bool, power_of_two: bool,
                   ieee: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    src, valid = _rows(src_ref, i * bm, bm, n, t)
    tile, _, cols = _tile(x_ref, src, valid, j * TILE, d)
    tile = jnp.where(valid[:, None], tile, 0)
    out_rows = i * bm + jnp.arange(bm)
    in_out = out_rows < n
    out_mask = in_out[:, None] & (cols < d)[None, :]
    _store_tile(out_refs[0], out_rows, cols, out_mask, tile)
    if quantize:
        xq_ref, scale_ref = out_refs[1:]
        tile = tile.astype(jnp.float32)
        amax = jnp.max(jnp.abs(tile), axis=1)
        scale = _div(jnp.maximum(amax, jnp.float32(AMAX_FLOOR)), jnp.full_like(amax, FP8_MAX), ieee)
        if power_of_two:   # round a normal positive float up to 2^e: carry any mantissa bit into the exponent
            bits = lax.bitcast_convert_type(scale, jnp.int32)
            scale = lax.bitcast_convert_type((bits + 0x7FFFFF) & jnp.int32(-0x800000), jnp.float32)
        _store_tile(xq_ref, out_rows, cols, out_mask, jnp.clip(_div(tile, scale[:, None], ieee), -FP8_MAX, FP8_MAX))
        plt.store(scale_ref.at[out_rows, j], scale, mask=in_out)


@functools.partial(jax.jit, static_argnames=("quantize", "power_of_two", "interpret", "block_rows"))
def gather_rows(x_TD, src_N, *, quantize: bool = False, power_of_two: bool = False, interpret=False,
                block_rows: int = BLOCK_ROWS):
    """Rows x_TD[src_N], a copy per tile (and, with `quantize`, fused E4M3 1×128 quantization of the tile: amax,
    scale, clip, cast)."""
    (T, D), N = x_TD.shape, src_N.shape[0]
    bm, Db = _block(N, block_rows), pl.cdiv(D, TILE)
    out_shape = [jax.ShapeDtypeStruct((N, D), x_TD.dtype)]
    if quantize:
        out_shape += [jax.ShapeDtypeStruct((N, D), FP8_DTYPE), jax.ShapeDtypeStruct((N, Db), jnp.float32)]
    outs = pl.pallas_call(
        functools.partial(_gather_kernel, n=N, t=T, d=D, bm=bm, quantize=quantize, power_of_two=power_of_two,
                          ieee=not interpret),
        grid=(pl.cdiv(N, bm), Db),
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS),
        cost_estimate=cost_estimate(flops=(6 if quantize else 0) * N * D,
                                    bytes_accessed=nbytes(src_N, *out_shape) + N * D * x_TD.dtype.itemsize),
        interpret=interpret,
    )(src_N.astype(jnp.int32), x_TD)
    return (outs[0], outs[1], outs[2]) if quantize else (outs[0], None, None)


def _combine_kernel(row_ref, y_ref, *rest, t: int, n: int, d: int, k: int, bt: int, weighted: bool):
    w_ref, out_ref = rest if weighted else (None, rest[0])
    i, j = pl.program_id(0), pl.program_id(1)
    tokens = i * bt + jnp.arange(bt)
    in_t = tokens < t
    acc = jnp.zeros((bt, TILE), jnp.float32)
    for c in range(k):
        # row_ref is [T, K] flattened: (token, choice c) at token·K + c.
        idx = plt.load(row_ref.at[tokens * k + c], mask=in_t, other=-1)
        valid = (idx >= 0) & (idx < n)
        y, _, cols = _tile(y_ref, jnp.where(valid, idx, 0), valid, j * TILE, d)
        y = y.astype(jnp.float32)
        if weighted:
            y = y * plt.load(w_ref.at[tokens * k + c], mask=in_t, other=0)[:, None]
        acc = acc + y
    _store_tile(out_ref, tokens, cols, in_t[:, None] & (cols < d)[None, :], acc)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "block_tokens"))
def combine_rows(y_ND, row_TK, weights_TK, out_dtype, *, interpret=False, block_tokens: int = BLOCK_TOKENS):
    """Per token tile, its K gathered tiles weighted and summed in float32."""
    (N, D), (T, K) = y_ND.shape, row_TK.shape
    bt = _block(T, block_tokens)
    weighted = weights_TK is not None
    args = [row_TK.reshape(-1).astype(jnp.int32), y_ND]
    if weighted:
        args.append(weights_TK.reshape(-1).astype(jnp.float32))
    return pl.pallas_call(
        functools.partial(_combine_kernel, t=T, n=N, d=D, k=K, bt=bt, weighted=weighted),
        grid=(pl.cdiv(T, bt), pl.cdiv(D, TILE)),
        out_shape=jax.ShapeDtypeStruct((T, D), out_dtype),
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS),
        cost_estimate=cost_estimate(flops=(2 if weighted else 1) * T * K * D, bytes_accessed=nbytes(
            args[0], *args[2:]) + T * K * D * y_ND.dtype.itemsize + T * D * jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
    )(*args)


def _combine_grad_kernel(src_ref, dout_ref, y_ref, w_ref, dy_ref, dw_ref, *, n: int, t: int, d: int, bm: int):
    i = pl.program_id(0)
    src, valid = _rows(src_ref, i * bm, bm, n, t)
    rows = i * bm + jnp.arange(bm)
    in_n = rows < n
    w = plt.load(w_ref.at[rows], mask=in_n, other=0)

    def column_tile(j, dw):
        g, _, cols = _tile(dout_ref, src, valid, j * TILE, d)
        g = jnp.where(valid[:, None], g.astype(jnp.float32), 0)
        y, mask, _ = _tile(y_ref, rows, in_n, j * TILE, d)
        _store_tile(dy_ref, rows, cols, mask, g * w[:, None])
        return dw + jnp.sum(y.astype(jnp.float32) * g, axis=1)

    dw = lax.fori_loop(0, pl.cdiv(d, TILE), column_tile, jnp.zeros((bm,), jnp.float32))
    plt.store(dw_ref.at[rows], dw, mask=in_n)


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows"))
def combine_rows_grad(y_ND, dout_TD, src_N, w_N, *, interpret=False, block_rows: int = BLOCK_ROWS):
    """dy = w · dout[src]; dw = <y, dout[src]> accumulated over the column tiles in-program."""
    (N, D), T = y_ND.shape, dout_TD.shape[0]
    bm = _block(N, block_rows)
    return pl.pallas_call(
        functools.partial(_combine_grad_kernel, n=N, t=T, d=D, bm=bm),
        grid=(pl.cdiv(N, bm),),
        out_shape=[jax.ShapeDtypeStruct((N, D), y_ND.dtype), jax.ShapeDtypeStruct((N,), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS),
        # reads src, w, y and the gathered dout rows; writes dy (y's size) and dw (float32)
        cost_estimate=cost_estimate(flops=3 * N * D, bytes_accessed=nbytes(src_N, w_N, y_ND, y_ND) + 4 * N
                                    + N * D * dout_TD.dtype.itemsize),
        interpret=interpret,
    )(src_N.astype(jnp.int32), dout_TD, y_ND, w_N.astype(jnp.float32))
