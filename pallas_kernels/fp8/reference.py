"""Reference block-scaled FP8 matmul in plain jnp: the definition the Pallas kernels are held to.

For each 128-wide block k of the contraction, the FP8 operands are multiplied exactly into float32, the partial
product is scaled by `a_scale[m, k] · b_scale[k, n]` and added to a float32 accumulator (DeepSeek-V3's
"promotion every 128 elements of K"). `b_scale` is per 128×128 block [Kb, Nb] (weights) or per 128×1 tile
[Kb, N] (the token-blocked operand of a weight gradient).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8.quantize import TILE, _cdiv


def column_scales(b_scale, N: int):
    """b_scale as [Kb, N]: one scale per (K block, column), expanding 128×128 block scales along N."""
    if b_scale.shape[1] == N:
        return b_scale.astype(jnp.float32)
    if b_scale.shape[1] != _cdiv(N, TILE):
        raise ValueError(f"b_scale has {b_scale.shape[1]} columns; expected ceil(N/128)={_cdiv(N, TILE)} "
                         f"(128×128 blocks) or N={N} (128×1 tiles)")
    return jnp.repeat(b_scale.astype(jnp.float32), TILE, axis=1)[:, :N]


def check_operands(a_q_MK, a_scale_MKb, b_q_KN, b_scale):
    (M, K), (K2, N) = a_q_MK.shape, b_q_KN.shape
    Kb = _cdiv(K, TILE)
    if K != K2:
        raise ValueError(f"fp8_matmul: contraction mismatch, a is {a_q_MK.shape} and b is {b_q_KN.shape}")
    if a_scale_MKb.shape != (M, Kb):
        raise ValueError(f"fp8_matmul: a_scale must be [M, ceil(K/128)] = {(M, Kb)}, got {a_scale_MKb.shape}")
    if b_scale.ndim != 2 or b_scale.shape[0] != Kb:
        raise ValueError(f"fp8_matmul: b_scale must be [ceil(K/128)={Kb}, ceil(N/128) or N], got {b_scale.shape}")
    return M, K, N, Kb


def fp8_matmul(a_q_MK, a_scale_MKb, b_q_KN, b_scale, out_dtype=jnp.bfloat16):
    """Σ_k (a_q[:, k] · b_q[k, :]) · a_scale[:, k] · b_scale[k, :], accumulated in float32, cast to out_dtype.

    One step of a scan per 128-wide K block (K = 18,432 is 144 blocks: a loop, not 144 dots in the program)."""
    M, K, N, Kb = check_operands(a_q_MK, a_scale_MKb, b_q_KN, b_scale)
    a_KbMC = jnp.pad(a_q_MK, ((0, 0), (0, Kb * TILE - K))).reshape(M, Kb, TILE).swapaxes(0, 1)   # upcast per step
    b_KbCN = jnp.pad(b_q_KN, ((0, Kb * TILE - K), (0, 0))).reshape(Kb, TILE, N)
    sa_KbM, sb_KbN = a_scale_MKb.astype(jnp.float32).T, column_scales(b_scale, N)

    def add_block(acc_MN, block):
        a_MC, b_CN, sa_M, sb_N = block
        # Products of two E4M3 values are exact in float32; only the 128-term sum rounds.
        partial_MN = jnp.dot(a_MC.astype(jnp.float32), b_CN.astype(jnp.float32), preferred_element_type=jnp.float32)
        return acc_MN + partial_MN * sa_M[:, None] * sb_N[None, :], None

    acc_MN, _ = lax.scan(add_block, jnp.zeros((M, N), jnp.float32), (a_KbMC, b_KbCN, sa_KbM, sb_KbN))
    return acc_MN.astype(out_dtype)
