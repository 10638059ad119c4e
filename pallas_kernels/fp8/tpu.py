"""Block-scaled FP8 matmul as a TPU Pallas kernel over an (T/bm, J/bn, C/128) grid, tiles upcast to bf16 for the MXU
and accumulated in float32. Same math as `reference.fp8_matmul`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cost import cost_estimate, nbytes
from pallas_kernels.fp8.quantize import TILE
from pallas_kernels.fp8.reference import check_operands, column_scales
from pallas_kernels.tpu_lanes import div_nonneg, pick_column, pick_row, rem_nonneg

def _kernel(a_ref, b_ref, sa_ref, sb_ref, out_ref, acc_ref):
    """Each step loads a (bm, 128) tile of a and a (128, bn) tile of b, upcasts them to bf16 (exact for E4M3; chips
    without an FP8 MXU need it), multiplies on the MXU into float32, scales by the (bm, 1) and (1, bn) scale vectors
    of that C block and adds into a float32 VMEM accumulator, written out after the last C block."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    partial = jnp.dot(a_ref[...].astype(jnp.bfloat16), b_ref[...].astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)
    sa_T1 = pick_column(sa_ref[...], rem_nonneg(k, TILE))
    sb_1J = pick_row(sb_ref[...], rem_nonneg(k, 8))
    acc_ref[...] += partial * sa_T1 * sb_1J

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
def fp8_matmul(a_q_TC, a_scale_TCb, b_q_CJ, b_scale, out_dtype=jnp.bfloat16, block_m: int = 256,
               block_n: int = 256, interpret: bool = False):
    """`reference.fp8_matmul` on the kernel. The scales stay lane-dense in memory: a_scale as [T, Cb] read in (bm, 128)
    blocks (one block serves 128 C steps) and b_scale as [Cb, J] in (8, bn) blocks; each step picks its column / row
    in-register (pallas_kernels.tpu_lanes), because (n, 1)-shaped scale arrays would be padded 128-fold in TPU
    memory. Operands are zero-padded to whole tiles and the result sliced back, so any T, J, C work."""
    T, C, J, Cb = check_operands(a_q_TC, a_scale_TCb, b_q_CJ, b_scale)
    Tp, Jp, Cp = pl.cdiv(T, TILE) * TILE, pl.cdiv(J, TILE) * TILE, Cb * TILE
    bm, bn = _block(Tp, block_m), _block(Jp, block_n)
    a = jnp.pad(a_q_TC, ((0, Tp - T), (0, Cp - C)))
    b = jnp.pad(b_q_CJ, ((0, Cp - C), (0, Jp - J)))
    # Scales lane-dense: a's as [Tp, Cb rounded up to 128], b's as [Cb rounded up to 8, Jp].
    sa_TCb = jnp.pad(a_scale_TCb.astype(jnp.float32), ((0, Tp - T), (0, pl.cdiv(Cb, TILE) * TILE - Cb)))
    sb_CbJ = jnp.pad(column_scales(b_scale, J), ((0, pl.cdiv(Cb, 8) * 8 - Cb), (0, Jp - J)))

    return pl.pallas_call(
        _kernel,
        grid=(Tp // bm, Jp // bn, Cb),
        in_specs=[
            pl.BlockSpec((bm, TILE), lambda i, j, k: (i, k)),
            pl.BlockSpec((TILE, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((bm, TILE), lambda i, j, k: (i, div_nonneg(k, TILE))),
            pl.BlockSpec((8, bn), lambda i, j, k: (div_nonneg(k, 8), j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Tp, Jp), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        # a is streamed once per column of tiles, b once per row of tiles; 3 flops per output and C block scale.
        cost_estimate=cost_estimate(
            flops=2 * Tp * Jp * Cp + 3 * Tp * Jp * Cb,
            bytes_accessed=nbytes(a, sa_TCb) * (Jp // bn) + nbytes(b, sb_CbJ) * (Tp // bm)
            + Tp * Jp * jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
    )(a, b, sa_TCb, sb_CbJ)[:T, :J]
