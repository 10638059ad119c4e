"""E4M3 quantization with one float32 scale per tile (1×128, 128×1 or 128×128), as in DeepSeek-V3's FP8 recipe:
`real ≈ x_q · scale`; `dequantize` is the one inverse for every tiling, on numpy or jax arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0      # largest finite E4M3FN value
TILE = 128
# DeepSeek's inference code floors amax at 1e-4, which suits activations but would flush back-propagated
# gradients (often 1e-6 .. 1e-9 per element) to a few subnormal FP8 codes. This floor only keeps all-zero tiles
# from dividing by zero and keeps every scale a normal float32 (amax / 448 >= 2^-126 needs amax >= ~5.3e-36).
AMAX_FLOOR = 1e-30




def _pad_to_tiles(x, axes):
    pads = [(0, 0)] * x.ndim
    for a in axes:
        pads[a] = (0, pl.cdiv(x.shape[a], TILE) * TILE - x.shape[a])
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
    """x / scale clipped to ±448 before the cast, so no finite input yields NaN (E4M3FN has no Inf: an overflowing
    cast gives NaN, hence the clip). Callers zero-pad edge tiles of shapes that are not multiples of 128 for the amax
    only; the quantized arrays keep the input's shape, the scales have ceil(dim / 128) entries along tiled axes."""
    return jnp.clip(x_f32 / scale_f32, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def quantize_1x128(x_TC, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """x [T, C] -> (x_q e4m3 [T, C], scale f32 [T, ceil(C/128)]): one scale per row per 128 columns."""
    T, C = x_TC.shape
    x_TCbc = _pad_to_tiles(x_TC.astype(jnp.float32), [1]).reshape(T, -1, TILE)
    scale_TCb = scale_from_amax(jnp.max(jnp.abs(x_TCbc), axis=-1), power_of_two, amax_floor)
    x_q = _cast(x_TCbc, scale_TCb[..., None]).reshape(T, -1)[:, :C]
    return x_q, scale_TCb


def quantize_128x1(x_TC, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """x [T, C] -> (x_q e4m3 [T, C], scale f32 [ceil(T/128), C]): one scale per 128 rows per column."""
    xt_q, scale_CTb = quantize_1x128(x_TC.T, power_of_two, amax_floor)
    return xt_q.T, scale_CTb.T


def quantize_128x128(w_CJ, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """w [C, J] -> (w_q e4m3 [C, J], scale f32 [ceil(C/128), ceil(J/128)]): one scale per 128×128 block."""
    C, J = w_CJ.shape
    w = _pad_to_tiles(w_CJ.astype(jnp.float32), [0, 1])
    Cb, Jb = w.shape[0] // TILE, w.shape[1] // TILE
    w_CbcJbj = w.reshape(Cb, TILE, Jb, TILE)
    scale_CbJb = scale_from_amax(jnp.max(jnp.abs(w_CbcJbj), axis=(1, 3)), power_of_two, amax_floor)
    w_q = _cast(w_CbcJbj, scale_CbJb[:, None, :, None]).reshape(Cb * TILE, Jb * TILE)[:C, :J]
    return w_q, scale_CbJb


def dequantize(x_q_X, scale_X, tile: tuple[int, int], dtype=np.float32):
    """x_q · scale in float32, returned in `dtype`. Each scale covers one `tile` = (rows, cols) block of the last two
    axes (1×128, 128×1, 128×128, or a checkpoint's own block size), edge blocks cropped; leading axes (layers,
    experts) pair one to one: scale_X is (..., ceil(rows / tile[0]), ceil(cols / tile[1])). Any block size, numpy or
    jax arrays."""
    shape = tuple(x_q_X.shape)
    want = shape[:-2] + (pl.cdiv(shape[-2], tile[0]), pl.cdiv(shape[-1], tile[1])) if len(shape) >= 2 else None
    if tuple(scale_X.shape) != want:
        raise ValueError(f"FP8 scale has shape {tuple(scale_X.shape)}; a tensor of shape {shape} in "
                         f"{tile[0]}x{tile[1]} tiles needs {want}")
    # Host arrays (checkpoint tensors of up to gigabytes) stay in numpy: no device copy, no compile per shape.
    xp = np if isinstance(x_q_X, np.ndarray) and isinstance(scale_X, np.ndarray) else jnp
    full = xp.repeat(xp.repeat(scale_X.astype(np.float32), tile[0], axis=-2), tile[1], axis=-1)
    return (x_q_X.astype(np.float32) * full[..., :shape[-2], :shape[-1]]).astype(dtype, copy=False)
