"""E4M3 tile quantization: never NaN/Inf on finite input, within half an E4M3 step of the input, full use of
the ±448 range, power-of-two scales that are powers of two, and the three tilings' shapes on unaligned sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pallas_kernels.fp8 import (AMAX_FLOOR, FP8_MAX, dequantize, quantize_1x128, quantize_128x1,
                                quantize_128x128)

QUANTIZERS = {  # name -> (function, tile shape)
    "1x128": (jax.jit(quantize_1x128, static_argnums=1), (1, 128)),
    "128x1": (jax.jit(quantize_128x1, static_argnums=1), (128, 1)),
    "128x128": (jax.jit(quantize_128x128, static_argnums=1), (128, 128)),
}
F32_MAX = float(np.finfo(np.float32).max)

# Magnitudes from subnormal float32 to float32's max, zeros and both signs, in a handful of odd shapes
# (few shapes, so few compilations).
finite_f32 = st.one_of(
    st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-38, 1e-30, 3e38, -3.4e38, 448.0, 449.0, 464.0, 1e-4]),
)
shapes = st.sampled_from([(1, 1), (3, 129), (130, 5), (129, 257)])


def check_quantized(x, q, scale, tile):
    """Finite, |q| <= 448, positive finite scales, and |q·s - x| within half an E4M3 step."""
    q32 = np.asarray(q.astype(jnp.float32), np.float64)
    s = np.asarray(scale, np.float64)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert np.isfinite(q32).all() and (np.abs(q32) <= FP8_MAX).all()
    assert np.isfinite(s).all() and (s > 0).all()
    s_full = np.repeat(np.repeat(s, tile[0], 0), tile[1], 1)[: x.shape[0], : x.shape[1]]
    err = np.abs(q32 * s_full - np.asarray(x, np.float64))
    # Normal E4M3: relative step 2^-3, so error <= 2^-4·|x|; subnormal step 2^-9 (in units of the scale).
    bound = np.maximum(2.0**-4 * np.abs(np.asarray(x, np.float64)), 2.0**-10 * s_full) * (1 + 1e-6) + 1e-45
    assert (err <= bound).all(), float(np.max(err / bound))
    with np.errstate(over="ignore"):   # within 2^-4 of float32's max, q·s may round past it (to inf) in float32
        expected = (q32 * s_full).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(dequantize(q, scale, tile)), expected)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("power_of_two", [False, True])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_finite_inputs_quantize_without_nan_or_inf(name, power_of_two, data):
    shape = data.draw(shapes)
    x = data.draw(hnp.arrays(np.float32, shape, elements=finite_f32))
    fn, tile = QUANTIZERS[name]
    q, scale = fn(jnp.asarray(x), power_of_two)
    assert scale.shape == (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    check_quantized(x, q, scale, tile)
    if power_of_two:
        mantissa, _ = np.frexp(np.asarray(scale))
        assert (mantissa == 0.5).all()


def test_tile_amax_maps_to_448_and_zero_tiles_stay_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 300)).astype(np.float32) * np.array([[1e-20], [1.0], [1e30]], np.float32)
    x[:, 256:] = 0.0                                 # the last (partial) tile is all zeros
    q, scale = quantize_1x128(jnp.asarray(x))
    q32 = np.abs(np.asarray(q.astype(jnp.float32)))
    assert (q32[:, :256].reshape(3, 2, 128).max(-1) == FP8_MAX).all()
    assert not q32[:, 256:].any()
    np.testing.assert_allclose(np.asarray(scale[:, 2]), AMAX_FLOOR / FP8_MAX, rtol=1e-6)
    q2, scale2 = quantize_1x128(jnp.asarray(x), True)
    assert (np.abs(np.asarray(q2[:, :256].astype(jnp.float32))).reshape(3, 2, 128).max(-1) > FP8_MAX / 2).all()
    assert (np.asarray(scale2) >= np.asarray(scale)).all()


def test_bfloat16_extremes_and_tilings_agree():
    big = float(jnp.finfo(jnp.bfloat16).max)
    x = jnp.asarray(np.array([[big, -big, 1e-38, 0.0] * 40] * 3), jnp.bfloat16)
    for name, (fn, tile) in QUANTIZERS.items():
        q, scale = fn(x, False)
        check_quantized(np.asarray(x, np.float32), q, scale, tile)
    # 128×1 tiles of x are the 1×128 tiles of xᵀ.
    y = jnp.asarray(np.random.default_rng(1).normal(size=(200, 70)), jnp.float32)
    q_cols, s_cols = quantize_128x1(y)
    q_rows, s_rows = quantize_1x128(y.T)
    np.testing.assert_array_equal(np.asarray(q_cols.astype(jnp.float32)), np.asarray(q_rows.astype(jnp.float32)).T)
    np.testing.assert_array_equal(np.asarray(s_cols), np.asarray(s_rows).T)


def test_dequantize_stacked_blocks_of_any_size_on_numpy_and_jax():
    """Leading (layer, expert) axes, a 64x32 block (a checkpoint's own weight_block_size), edge blocks cropped on
    both axes; numpy inputs stay numpy and give jax's values bit for bit, in the dtype asked for."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 3, 100, 70)).astype(jnp.float8_e4m3fn)
    scale = rng.uniform(0.5, 2.0, size=(2, 3, 2, 3)).astype(np.float32)      # ceil(100/64), ceil(70/32)
    expected = np.empty(q.shape, np.float32)
    for r in range(100):
        for c in range(70):
            expected[..., r, c] = q[..., r, c].astype(np.float32) * scale[..., r // 64, c // 32]
    on_host = dequantize(q, scale, (64, 32))
    assert isinstance(on_host, np.ndarray) and on_host.dtype == np.float32
    np.testing.assert_array_equal(on_host, expected)
    on_device = jax.jit(dequantize, static_argnums=(2, 3))(jnp.asarray(q), jnp.asarray(scale), (64, 32), jnp.bfloat16)
    assert on_device.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(on_device), expected.astype(jnp.bfloat16))
    np.testing.assert_array_equal(dequantize(q, scale, (64, 32), jnp.bfloat16), expected.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"FP8 scale has shape \(2, 3, 2, 2\)"):
        dequantize(q, scale[..., :2], (64, 32))
