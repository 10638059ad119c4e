"""E4M3 quantization with one float32 scale per tile, as in DeepSeek-V3's FP8 recipe.

`real ≈ x_q · scale`, with `scale = max(amax, AMAX_FLOOR) / 448` per tile (optionally rounded up to a power of
two) and `x / scale` clipped to ±448 before the cast, so no finite input yields NaN (E4M3FN has no Inf: an
overflowing cast gives NaN, hence the clip). Tiles: 1×128 (per row, per 128 columns), 128×1 (per 128 rows, per
column) and 128×128. Edge tiles of shapes that are not multiples of 128 are zero-padded for the amax only; the
quantized arrays keep the input's shape, the scales have ceil(dim / 128) entries along tiled axes.
"""

from __future__ import annotations

import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0      # largest finite E4M3FN value
TILE = 128
# DeepSeek's inference code floors amax at 1e-4, which suits activations but would flush back-propagated
# gradients (often 1e-6 .. 1e-9 per element) to a few subnormal FP8 codes. This floor only keeps all-zero tiles
# from dividing by zero and keeps every scale a normal float32 (amax / 448 >= 2^-126 needs amax >= ~5.3e-36).
AMAX_FLOOR = 1e-30


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to_tiles(x, axes):
    pads = [(0, 0)] * x.ndim
    for a in axes:
        pads[a] = (0, _cdiv(x.shape[a], TILE) * TILE - x.shape[a])
    return jnp.pad(x, pads)


def scale_from_amax(amax, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """float32 scale = max(amax, floor) / 448, rounded up to 2^e when `power_of_two` (UE8M0-style scales)."""
    scale = jnp.maximum(amax.astype(jnp.float32), jnp.float32(amax_floor)) / jnp.float32(FP8_MAX)
    if power_of_two:
        mantissa, exponent = jnp.frexp(scale)          # scale = mantissa · 2^exponent, mantissa in [0.5, 1)
        exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
        scale = jnp.ldexp(jnp.ones_like(scale), exponent)
    return scale


def _cast(x_f32, scale_f32):
    return jnp.clip(x_f32 / scale_f32, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def quantize_1x128(x_MK, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """x [M, K] -> (x_q e4m3 [M, K], scale f32 [M, ceil(K/128)]): one scale per row per 128 columns."""
    M, K = x_MK.shape
    x_MKbC = _pad_to_tiles(x_MK.astype(jnp.float32), [1]).reshape(M, -1, TILE)
    scale_MKb = scale_from_amax(jnp.max(jnp.abs(x_MKbC), axis=-1), power_of_two, amax_floor)
    x_q = _cast(x_MKbC, scale_MKb[..., None]).reshape(M, -1)[:, :K]
    return x_q, scale_MKb


def quantize_128x1(x_MK, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """x [M, K] -> (x_q e4m3 [M, K], scale f32 [ceil(M/128), K]): one scale per 128 rows per column."""
    xt_q, scale_KMb = quantize_1x128(x_MK.T, power_of_two, amax_floor)
    return xt_q.T, scale_KMb.T


def quantize_128x128(w_KN, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """w [K, N] -> (w_q e4m3 [K, N], scale f32 [ceil(K/128), ceil(N/128)]): one scale per 128×128 block."""
    K, N = w_KN.shape
    w = _pad_to_tiles(w_KN.astype(jnp.float32), [0, 1])
    Kb, Nb = w.shape[0] // TILE, w.shape[1] // TILE
    w_KbCNbC = w.reshape(Kb, TILE, Nb, TILE)
    scale_KbNb = scale_from_amax(jnp.max(jnp.abs(w_KbCNbC), axis=(1, 3)), power_of_two, amax_floor)
    w_q = _cast(w_KbCNbC, scale_KbNb[:, None, :, None]).reshape(Kb * TILE, Nb * TILE)[:K, :N]
    return w_q, scale_KbNb


def dequantize(x_q_MK, scale, tile: tuple[int, int]):
    """float32 x_q · scale, where each scale covers a `tile` = (rows, cols) block: (1, 128), (128, 1) or (128, 128)."""
    M, K = x_q_MK.shape
    full = jnp.repeat(jnp.repeat(scale, tile[0], axis=0), tile[1], axis=1)[:M, :K]
    return x_q_MK.astype(jnp.float32) * full
