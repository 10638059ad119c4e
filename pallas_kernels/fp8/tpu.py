"""Block-scaled FP8 matmul as a TPU Pallas kernel over an (M/bm, N/bn, K/128) grid.

Each step loads a (bm, 128) tile of a and a (128, bn) tile of b, upcasts them to bf16 (exact for E4M3; chips
without an FP8 MXU need it), multiplies on the MXU into float32, scales by the (bm, 1) and (1, bn) scale vectors
of that K block and adds into a float32 VMEM accumulator, written out after the last K block. The scales stay
lane-dense in memory: a_scale as [M, Kb] read in (bm, 128) blocks (one block serves 128 K steps) and b_scale as
[Kb, N] in (8, bn) blocks; each step picks its column / row in-register (pallas_kernels.tpu_lanes), because
(n, 1)-shaped scale arrays would be padded 128-fold in TPU memory. Operands are
zero-padded to whole tiles and the result sliced back, so any M, N, K work. Same math as `reference.fp8_matmul`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cost import cost_estimate, nbytes
from pallas_kernels.fp8.quantize import TILE, _cdiv
from pallas_kernels.fp8.reference import check_operands, column_scales
from pallas_kernels.tpu_lanes import div_nonneg, pick_column, pick_row, rem_nonneg

def _kernel(a_ref, b_ref, sa_ref, sb_ref, out_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    partial = jnp.dot(a_ref[...].astype(jnp.bfloat16), b_ref[...].astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)
    sa_M1 = pick_column(sa_ref[...], rem_nonneg(k, TILE))
    sb_1N = pick_row(sb_ref[...], rem_nonneg(k, 8))
    acc_ref[...] += partial * sa_M1 * sb_1N

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _block(size: int, preferred: int) -> int:
    """The largest of preferred, preferred/2, ..., 128 that divides `size` (a multiple of 128)."""
    b = preferred
    while b > TILE and size % b:
        b //= 2
    return b


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "interpret"))
def fp8_matmul(a_q_MK, a_scale_MKb, b_q_KN, b_scale, out_dtype=jnp.bfloat16, block_m: int = 256,
               block_n: int = 256, interpret: bool = False):
    M, K, N, Kb = check_operands(a_q_MK, a_scale_MKb, b_q_KN, b_scale)
    Mp, Np, Kp = _cdiv(M, TILE) * TILE, _cdiv(N, TILE) * TILE, Kb * TILE
    bm, bn = _block(Mp, block_m), _block(Np, block_n)
    a = jnp.pad(a_q_MK, ((0, Mp - M), (0, Kp - K)))
    b = jnp.pad(b_q_KN, ((0, Kp - K), (0, Np - N)))
    # Scales lane-dense: a's as [Mp, Kb rounded up to 128], b's as [Kb rounded up to 8, Np].
    sa_MKb = jnp.pad(a_scale_MKb.astype(jnp.float32), ((0, Mp - M), (0, _cdiv(Kb, TILE) * TILE - Kb)))
    sb_KbN = jnp.pad(column_scales(b_scale, N), ((0, _cdiv(Kb, 8) * 8 - Kb), (0, Np - N)))

    return pl.pallas_call(
        _kernel,
        grid=(Mp // bm, Np // bn, Kb),
        in_specs=[
            pl.BlockSpec((bm, TILE), lambda i, j, k: (i, k)),
            pl.BlockSpec((TILE, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((bm, TILE), lambda i, j, k: (i, div_nonneg(k, TILE))),
            pl.BlockSpec((8, bn), lambda i, j, k: (div_nonneg(k, 8), j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        # a is streamed once per column of tiles, b once per row of tiles; 3 flops per output and K block scale.
        cost_estimate=cost_estimate(
            flops=2 * Mp * Np * Kp + 3 * Mp * Np * Kb,
            bytes_accessed=nbytes(a, sa_MKb) * (Np // bn) + nbytes(b, sb_KbN) * (Mp // bm)
            + Mp * Np * jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
    )(a, b, sa_MKb, sb_KbN)[:M, :N]
