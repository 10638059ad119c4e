"""Rotary position embedding on interleaved pairs (dims 2i, 2i+1), with YaRN frequency scaling as DeepSeek and Hugging
Face do it; YaRN's mscale enters the softmax scale (see ModelConfig.softmax_scale).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, YarnConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_len: int) -> float:
    return dim * math.log(max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(dim: int, theta: float, yarn: YarnConfig | None) -> np.ndarray:
    """The dim/2 rotation frequencies (float32), YaRN-scaled when `yarn` is given: frequencies above the `beta_fast`
    correction dim keep their value, those below `beta_slow` are divided by `factor`, with a linear ramp between
    (cos/sin then carry an amplitude, `rope_amplitude`)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    if yarn is None:
        return inv_freq
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, theta, yarn.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, theta, yarn.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    interpolated = (1.0 / (np.float32(yarn.factor) / inv_freq)).astype(np.float32)
    return (interpolated * ramp + inv_freq * (1 - ramp)).astype(np.float32)


def rope_amplitude(yarn: YarnConfig | None) -> float:
    """Factor on cos and sin: 1 without YaRN; mscale/mscale_all_dim ratio (1 for V3) with it."""
    if yarn is None:
        return 1.0
    if yarn.attention_factor is not None:
        return float(yarn.attention_factor)
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def rope_tables(positions_BT, config: ModelConfig):
    """cos and sin of shape (B, T, rope_dim/2), float32."""
    inv_freq = jnp.asarray(inverse_frequencies(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling))
    angles_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    amplitude = rope_amplitude(config.rope_scaling)
    return jnp.cos(angles_BTR) * amplitude, jnp.sin(angles_BTR) * amplitude


def apply_rope(x_BTHR, cos_BTR, sin_BTR):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i; the output keeps the interleaved layout."""
    dtype = x_BTHR.dtype
    x = x_BTHR.astype(jnp.float32).reshape(*x_BTHR.shape[:-1], -1, 2)
    even, odd = x[..., 0], x[..., 1]
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x_BTHR.shape).astype(dtype)
