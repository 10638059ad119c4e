"""Reference block-scaled FP8 matmul in plain jnp: the definition the Pallas kernels are held to."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.fp8.quantize import TILE


def column_scales(b_scale, J: int):
    """b_scale as [Cb, J]: one scale per (C block, column), expanding 128×128 block scales along J."""
    if b_scale.shape[1] == J:
        return b_scale.astype(jnp.float32)
    if b_scale.shape[1] != pl.cdiv(J, TILE):
        raise ValueError(f"b_scale has {b_scale.shape[1]} columns; expected ceil(J/128)={pl.cdiv(J, TILE)} "
                         f"(128×128 blocks) or J={J} (128×1 tiles)")
    return jnp.repeat(b_scale.astype(jnp.float32), TILE, axis=1)[:, :J]


def check_operands(a_q_TC, a_scale_TCb, b_q_CJ, b_scale):
    (T, C), (C2, J) = a_q_TC.shape, b_q_CJ.shape
    Cb = pl.cdiv(C, TILE)
    if C != C2:
        raise ValueError(f"fp8_matmul: contraction mismatch, a is {a_q_TC.shape} and b is {b_q_CJ.shape}")
    if a_scale_TCb.shape != (T, Cb):
        raise ValueError(f"fp8_matmul: a_scale must be [T, ceil(C/128)] = {(T, Cb)}, got {a_scale_TCb.shape}")
    if b_scale.ndim != 2 or b_scale.shape[0] != Cb:
        raise ValueError(f"fp8_matmul: b_scale must be [ceil(C/128)={Cb}, ceil(J/128) or J], got {b_scale.shape}")
    return T, C, J, Cb


def fp8_matmul(a_q_TC, a_scale_TCb, b_q_CJ, b_scale, out_dtype=jnp.bfloat16):
    """Σ_k (a_q[:, k] · b_q[k, :]) · a_scale[:, k] · b_scale[k, :], accumulated in float32, cast to out_dtype.

    For each 128-wide block k of the contraction, the FP8 operands are multiplied exactly into float32, the partial
    product is scaled by `a_scale[m, k] · b_scale[k, n]` and added to a float32 accumulator (DeepSeek-V3's promotion
    every 128 elements of the contraction). `b_scale` is per 128×128 block [Cb, Jb] (weights) or per 128×1 tile
    [Cb, J] (the token-blocked operand of a weight gradient).

    One step of a scan per 128-wide C block (C = 18,432 is 144 blocks: a loop, not 144 dots in the program)."""
    T, C, J, Cb = check_operands(a_q_TC, a_scale_TCb, b_q_CJ, b_scale)
    a_CbTc = jnp.pad(a_q_TC, ((0, 0), (0, Cb * TILE - C))).reshape(T, Cb, TILE).swapaxes(0, 1)   # upcast per step
    b_CbcJ = jnp.pad(b_q_CJ, ((0, Cb * TILE - C), (0, 0))).reshape(Cb, TILE, J)
    sa_CbT, sb_CbJ = a_scale_TCb.astype(jnp.float32).T, column_scales(b_scale, J)

    def add_block(acc_TJ, block):
        a_Tc, b_cJ, sa_T, sb_J = block
        # Products of two E4M3 values are exact in float32; only the 128-term sum rounds.
        partial_TJ = jnp.dot(a_Tc.astype(jnp.float32), b_cJ.astype(jnp.float32), preferred_element_type=jnp.float32)
        return acc_TJ + partial_TJ * sa_T[:, None] * sb_J[None, :], None

    acc_TJ, _ = lax.scan(add_block, jnp.zeros((T, J), jnp.float32), (a_CbTc, b_CbcJ, sa_CbT, sb_CbJ))
    return acc_TJ.astype(out_dtype)
