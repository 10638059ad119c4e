"""Interleaved RoPE and YaRN frequencies against independent NumPy/complex-number implementations."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig, YarnConfig
from dsv3_jax.model.layers.rope import apply_rope, inverse_frequencies, rope_amplitude, rope_tables
from dsv3_jax.config.presets import PRESETS

V3_YARN = PRESETS["v3-671b"].rope_scaling


def np_plain_freqs(dim, theta):
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def np_yarn_freqs(dim, theta, factor, original_len, beta_fast, beta_slow):
    """The formula of deepseek_v3.md, written out in float64."""
    def correction_dim(rotations):
        return dim * math.log(original_len / (2 * math.pi * rotations)) / (2 * math.log(theta))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    freq = np_plain_freqs(dim, theta)
    return freq / factor * ramp + freq * (1 - ramp), low, high


def complex_rope(x, angles):
    """Pairs (2i, 2i+1) as complex numbers, multiplied by e^{iθ}."""
    z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2].astype(np.float64)
    z = z * np.exp(1j * angles)
    out = np.empty(x.shape, np.float64)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def tiny(**kw) -> ModelConfig:
    return PRESETS["tiny"].replace(qk_rope_head_dim=16, **kw)


@pytest.mark.parametrize("yarn", [None, V3_YARN])
def test_apply_rope_is_complex_rotation_of_interleaved_pairs(yarn):
    c = tiny(rope_scaling=yarn)
    B, T, H, R = 2, 7, 3, c.qk_rope_head_dim
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, H, R)).astype(np.float32)
    positions = rng.integers(0, 5000, size=(B, T)).astype(np.int32)
    cos, sin = rope_tables(jnp.asarray(positions), c)
    assert cos.shape == (B, T, R // 2) and cos.dtype == jnp.float32
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    inv = inverse_frequencies(R, c.rope_theta, yarn).astype(np.float64)
    angles = positions[:, :, None, None].astype(np.float64) * inv
    # float32 angles of positions up to 5000 carry ~3e-4 absolute error.
    np.testing.assert_allclose(out, complex_rope(x, angles) * rope_amplitude(yarn), atol=3e-3)


def test_rotation_preserves_norms_and_is_relative():
    c = tiny()
    rng = np.random.default_rng(1)
    R = c.qk_rope_head_dim
    q = rng.normal(size=(1, 1, 1, R)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, R)).astype(np.float32)

    def rotate(x, pos):
        cos, sin = rope_tables(jnp.full((1, 1), pos, jnp.int32), c)
        return np.asarray(apply_rope(jnp.asarray(x), cos, sin)).astype(np.float64)

    for pos in (0, 1, 17, 300):
        np.testing.assert_allclose(np.linalg.norm(rotate(q, pos)), np.linalg.norm(q), rtol=1e-5)
        # pairwise norms too: the rotation acts within each (2i, 2i+1) pair
        np.testing.assert_allclose(np.hypot(rotate(q, pos)[..., 0::2], rotate(q, pos)[..., 1::2]),
                                   np.hypot(q[..., 0::2], q[..., 1::2]), rtol=1e-5)
    np.testing.assert_allclose(rotate(q, 0), q, rtol=1e-6)
    dots = [np.sum(rotate(q, m) * rotate(k, m - 5)) for m in (5, 9, 40, 123)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    assert abs(np.sum(rotate(q, 9) * rotate(k, 4)) - np.sum(rotate(q, 9) * rotate(k, 3))) > 1e-4


def test_apply_rope_keeps_dtype():
    c = tiny()
    x = jnp.ones((1, 3, 2, c.qk_rope_head_dim), jnp.bfloat16)
    cos, sin = rope_tables(jnp.arange(3)[None], c)
    assert apply_rope(x, cos, sin).dtype == jnp.bfloat16


def test_plain_frequencies():
    np.testing.assert_allclose(inverse_frequencies(64, 10000.0, None), np_plain_freqs(64, 10000.0), rtol=1e-6)


@pytest.mark.parametrize("dim,theta,factor,original_len,beta_fast,beta_slow", [
    (64, 10000.0, 40.0, 4096, 32.0, 1.0),     # DeepSeek-V3 / V2
    (64, 10000.0, 4.0, 4096, 32.0, 1.0),
    (32, 10000.0, 8.0, 2048, 16.0, 2.0),
    (16, 50000.0, 16.0, 1024, 32.0, 1.0),
])
def test_yarn_frequencies_match_formula(dim, theta, factor, original_len, beta_fast, beta_slow):
    yarn = YarnConfig(factor=factor, original_max_position_embeddings=original_len, beta_fast=beta_fast,
                      beta_slow=beta_slow)
    got = inverse_frequencies(dim, theta, yarn)
    want, low, high = np_yarn_freqs(dim, theta, factor, original_len, beta_fast, beta_slow)
    assert got.dtype == np.float32 and got.shape == (dim // 2,)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    plain = np_plain_freqs(dim, theta)
    np.testing.assert_allclose(got[:low], plain[:low], rtol=2e-6)                 # high frequencies kept
    np.testing.assert_allclose(got[high:], plain[high:] / factor, rtol=2e-6)      # low ones interpolated


def test_yarn_v3_boundaries():
    """d = 64, L = 4096: dim(32) = 10.47 → low 10, dim(1) = 22.50 → high 23."""
    _, low, high = np_yarn_freqs(64, 10000.0, 40.0, 4096, 32.0, 1.0)
    assert (low, high) == (10, 23)
    got = inverse_frequencies(64, 10000.0, V3_YARN)
    plain = np_plain_freqs(64, 10000.0)
    np.testing.assert_allclose(got[:11], plain[:11], rtol=2e-6)      # ramp is 0 up to and at index low
    np.testing.assert_allclose(got[23:], plain[23:] / 40, rtol=2e-6)
    ramp_16 = (16 - 10) / 13
    np.testing.assert_allclose(got[16], plain[16] * (1 - ramp_16) + plain[16] / 40 * ramp_16, rtol=2e-6)


def test_yarn_factor_one_is_plain():
    yarn = YarnConfig(factor=1.0)
    np.testing.assert_allclose(inverse_frequencies(64, 10000.0, yarn), np_plain_freqs(64, 10000.0), rtol=2e-6)
    assert rope_amplitude(yarn) == 1.0


def test_yarn_scales_attention_not_amplitude_for_deepseek():
    """mscale = mscale_all_dim: cos/sin keep amplitude 1; the softmax scale carries mscale² (0.135234)."""
    assert rope_amplitude(V3_YARN) == pytest.approx(1.0)
    assert rope_amplitude(PRESETS["v2-236b"].rope_scaling) == pytest.approx(1.0)
    assert PRESETS["v3-671b"].softmax_scale == pytest.approx(0.135234, abs=5e-7)
    mscale = 0.1 * math.log(40) + 1
    assert PRESETS["v3-671b"].softmax_scale == pytest.approx(mscale ** 2 / math.sqrt(192), rel=1e-12)
    assert PRESETS["tiny"].softmax_scale == pytest.approx(1 / math.sqrt(24), rel=1e-12)
    # HF's convention when only mscale is given: amplitude = 0.1·mscale·ln(factor) + 1 ratio.
    y = YarnConfig(factor=40.0, mscale=1.0, mscale_all_dim=0.5)
    assert rope_amplitude(y) == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1))
    assert rope_amplitude(YarnConfig(factor=4.0, attention_factor=1.25)) == 1.25


def test_rope_tables_use_positions():
    c = tiny()
    pos = jnp.array([[0, 1, 2, 0, 1]])
    cos, sin = rope_tables(pos, c)
    np.testing.assert_array_equal(np.asarray(cos[0, 3]), np.asarray(cos[0, 0]))
    np.testing.assert_allclose(np.asarray(cos[0, 0]), 1.0)
    np.testing.assert_allclose(np.asarray(sin[0, 0]), 0.0)
    inv = np_plain_freqs(c.qk_rope_head_dim, c.rope_theta)
    np.testing.assert_allclose(np.asarray(sin[0, 2]), np.sin(2 * inv), rtol=1e-5, atol=1e-7)
