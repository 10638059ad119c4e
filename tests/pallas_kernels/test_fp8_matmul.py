"""Block-scaled FP8 matmul: DeepGEMM's accuracy metric against the unquantized product for the reference and
the TPU kernel (interpret mode), the kernel against the reference on the same FP8 inputs, the scale semantics
against a float64 dequantized product, unaligned shapes, and the impl switch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import blockwise_matmul, dequantize, fp8_matmul, quantize_1x128, quantize_128x1, \
    quantize_128x128


def deepgemm_diff(x, y):
    """1 - 2Σxy / Σ(x² + y²) in float64 (0 for identical, ~σ²/2 for relative noise σ)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 1.0 - 2.0 * np.sum(x * y) / np.sum(x * x + y * y)


def operands(M, K, N, seed=0):
    rng = np.random.default_rng(seed)
    # Rows and columns of very different sizes, so per-tile scales matter.
    a = rng.normal(size=(M, K)) * np.exp(rng.normal(size=(M, 1)))
    b = rng.normal(size=(K, N)) * np.exp(0.5 * rng.normal(size=(1, N)))
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("impl, shape", [
    ("reference", (256, 512, 384)), ("reference", (200, 300, 130)), ("reference", (1000, 129, 7)),
    ("tpu", (256, 512, 384)), ("tpu", (200, 300, 130)),
])
def test_accuracy_against_the_unquantized_product(impl, shape):
    M, K, N = shape
    a, b = operands(M, K, N)
    y = blockwise_matmul(jnp.asarray(a), jnp.asarray(b), impl=impl, interpret=True)
    assert y.shape == (M, N) and y.dtype == jnp.bfloat16
    diff = deepgemm_diff(y, a.astype(np.float64) @ b)
    assert diff < 1e-3, diff


@pytest.mark.parametrize("shape", [(256, 512, 384), (200, 300, 130)])
@pytest.mark.parametrize("b_tiles", ["128x128", "128x1"])
def test_tpu_kernel_matches_reference_on_the_same_fp8_inputs(shape, b_tiles):
    M, K, N = shape
    a, b = operands(M, K, N, seed=1)
    a_q, a_s = quantize_1x128(jnp.asarray(a), True)
    b_q, b_s = (quantize_128x128 if b_tiles == "128x128" else quantize_128x1)(jnp.asarray(b))
    ref = np.asarray(fp8_matmul(a_q, a_s, b_q, b_s, impl="reference", out_dtype=jnp.float32), np.float64)
    ker = np.asarray(fp8_matmul(a_q, a_s, b_q, b_s, impl="tpu", out_dtype=jnp.float32, interpret=True), np.float64)
    rel = np.max(np.abs(ker - ref)) / np.max(np.abs(ref))
    assert rel < 1e-5, rel
    # Both compute the product of the dequantized operands (up to float32 summation).
    tile = (128, 128) if b_tiles == "128x128" else (128, 1)
    exact = np.asarray(dequantize(a_q, a_s, (1, 128)), np.float64) @ np.asarray(dequantize(b_q, b_s, tile), np.float64)
    assert np.max(np.abs(ref - exact)) / np.max(np.abs(exact)) < 1e-5


def test_zero_and_huge_operands_stay_finite():
    a = np.zeros((5, 200), np.float32)
    a[1] = 1e18
    a[2, :3] = 1e-30
    b = np.full((200, 3), 1e18, np.float32)
    y = np.asarray(blockwise_matmul(jnp.asarray(a), jnp.asarray(b), out_dtype=jnp.float32))
    assert np.isfinite(y).all() and not y[[0, 3, 4]].any()
    np.testing.assert_allclose(y[1], 200 * 1e36, rtol=1e-6)


def test_impl_switch_and_shape_errors():
    a_q, a_s = quantize_1x128(jnp.ones((4, 130)))
    b_q, b_s = quantize_128x128(jnp.ones((130, 6)))
    with pytest.raises(ValueError, match="impl='nope'"):
        fp8_matmul(a_q, a_s, b_q, b_s, impl="nope")
    with pytest.raises(ValueError, match="a_scale"):
        fp8_matmul(a_q, a_s[:, :1], b_q, b_s)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_matmul(a_q, a_s, b_q, jnp.ones((2, 2)))


def test_tpu_kernel_lowers_for_tpu():
    """Pallas -> Mosaic TPU lowering at a DeepSeek-V3 shape (no TPU needed; catches unsupported block shapes)."""
    import jax

    from pallas_kernels.fp8 import tpu

    M, K, N = 512, 7168, 2112
    args = (jax.ShapeDtypeStruct((M, K), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((M, K // 128), jnp.float32),
            jax.ShapeDtypeStruct((K, N), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((K // 128, -(-N // 128)), jnp.float32))
    lowered = jax.jit(tpu.fp8_matmul).trace(*args).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()
