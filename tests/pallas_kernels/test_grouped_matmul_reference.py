"""Reference grouped matmuls (the protocol: gmm, gmm_t, tgmm, gmm_fp8, tgmm_fp8) against per-group NumPy loops,
the differentiable api (`grouped_matmul`, `grouped_matmul_fp8`) with the reference impl, the group-aligned row
layout of the FP8 weight gradient, and the impl registry."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import quantize_1x128, quantize_128x128
from pallas_kernels.grouped_matmul import (aligned_rows, api, gather_rows, grouped_matmul,
                                           grouped_matmul_fp8, reference)

gmm = jax.jit(grouped_matmul)


def np_grouped_matmul(x, w, sizes):
    out = np.zeros((x.shape[0], w.shape[2]), np.float64)
    start = 0
    for g, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n].astype(np.float64) @ w[g].astype(np.float64)
        start += n
    return out   # rows past sum(sizes) stay 0


def naive_jnp(x, w, sizes):
    """Differentiable naive form: each row times the weight of the group it lies in (0 past the end)."""
    bounds = jnp.cumsum(sizes)
    rows = jnp.arange(x.shape[0])
    group = jnp.searchsorted(bounds, rows, side="right")
    valid = rows < bounds[-1]
    w_rows = w[jnp.minimum(group, w.shape[0] - 1)]
    return jnp.where(valid[:, None], jnp.einsum("mk,mkn->mn", x, w_rows), 0.0)


SIZES = {
    "even": [4, 4, 4, 4],
    "empty_groups": [0, 7, 0, 9],
    "all_in_one": [16, 0, 0, 0],
    "empty_last": [3, 5, 8, 0],
    "short": [2, 0, 5, 1],          # sums to 8 < M: the remaining rows give 0
    "all_empty": [0, 0, 0, 0],
}


@pytest.mark.parametrize("name", SIZES)
def test_matches_per_group_loop(name):
    sizes = np.array(SIZES[name], np.int32)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 24)).astype(np.float32)
    w = rng.normal(size=(4, 24, 8)).astype(np.float32)
    y = np.asarray(gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes)))
    np.testing.assert_allclose(y, np_grouped_matmul(x, w, sizes), rtol=1e-5, atol=1e-5)
    assert (y[sizes.sum():] == 0).all()


@pytest.mark.parametrize("name", ["even", "empty_groups", "all_in_one", "short"])
def test_gradients_match_naive(name):
    sizes = jnp.asarray(SIZES[name], jnp.int32)
    key_x, key_w, key_r = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(key_x, (16, 24))
    w = jax.random.normal(key_w, (4, 24, 8))
    r = jax.random.normal(key_r, (16, 8))
    loss = lambda f: (lambda x, w: jnp.sum(f(x, w, sizes) * r))
    gx, gw = jax.jit(jax.grad(loss(grouped_matmul), argnums=(0, 1)))(x, w)
    nx, nw = jax.jit(jax.grad(loss(naive_jnp), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(nx), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(nw), rtol=1e-5, atol=1e-5)
    # Empty groups get exactly zero weight gradient; rows past the groups get zero input gradient.
    for g, n in enumerate(SIZES[name]):
        if n == 0:
            assert not np.asarray(gw[g]).any()
    assert not np.asarray(gx[int(sizes.sum()):]).any()


def test_casts_weights_to_activation_dtype():
    x = jnp.ones((4, 8), jnp.bfloat16)
    w = jnp.full((2, 8, 3), 0.5, jnp.float32)
    y = reference.grouped_matmul(x, w, jnp.array([1, 3]))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), 4.0)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl='nope'"):
        grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]), impl="nope")


def ref_jit(name):
    return jax.jit(functools.partial(getattr(reference, name), out_dtype=jnp.float32))


GMM_T, TGMM, GMM_FP8, TGMM_FP8 = (ref_jit(n) for n in ("gmm_t", "tgmm", "gmm_fp8", "tgmm_fp8"))


def np_tgmm(x, dy, sizes):
    dw, start = np.zeros((len(sizes), x.shape[1], dy.shape[1])), 0
    for g, n in enumerate(sizes):
        dw[g] = np.asarray(x[start:start + n], np.float64).T @ np.asarray(dy[start:start + n], np.float64)
        start += n
    return dw


@pytest.mark.parametrize("name", SIZES)
def test_data_and_weight_gradient_products_match_per_group_loop(name):
    sizes = np.array(SIZES[name], np.int32)
    rng = np.random.default_rng(2)
    x, dy = rng.normal(size=(16, 24)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    w = rng.normal(size=(4, 24, 8)).astype(np.float32)
    dx = np.asarray(GMM_T(jnp.asarray(dy), jnp.asarray(w), jnp.asarray(sizes)))
    np.testing.assert_allclose(dx, np_grouped_matmul(dy, w.transpose(0, 2, 1), sizes), rtol=1e-5, atol=1e-5)
    assert not dx[sizes.sum():].any()
    dw = np.asarray(TGMM(jnp.asarray(x), jnp.asarray(dy), jnp.asarray(sizes)))
    np.testing.assert_allclose(dw, np_tgmm(x, dy, sizes), rtol=1e-5, atol=1e-5)
    assert all(not dw[g].any() for g, n in enumerate(sizes) if n == 0)


QUANTIZE_1X128 = jax.jit(quantize_1x128)


def np_dequantize(x_q, scale, tile):
    """float64 x_q · scale, each scale covering a `tile` = (rows, cols) block."""
    full = np.repeat(np.repeat(np.asarray(scale, np.float64), tile[0], 0), tile[1], 1)
    return np.asarray(x_q).astype(np.float64) * full[:x_q.shape[0], :x_q.shape[1]]


def test_fp8_products_are_the_dequantized_products():
    """Per 128 of the contraction: exact FP8 products, float32 sums, scaled; equal to the float64 product of the
    dequantized operands up to float32 rounding. Unaligned K and N, an empty first group, rows past the total."""
    M, K, N, sizes = 300, 200, 136, [0, 130, 0, 100]
    rng = np.random.default_rng(3)
    a = rng.normal(size=(M, K)) * np.exp(rng.normal(size=(M, 1)))
    b = rng.normal(size=(4, N, K)) * np.exp(rng.normal(size=(4, N, 1)))
    a_q, a_s = QUANTIZE_1X128(jnp.asarray(a, jnp.float32))
    b_q, b_s = jax.jit(jax.vmap(quantize_128x128))(jnp.asarray(b, jnp.float32))
    y = np.asarray(GMM_FP8(a_q, a_s, b_q, b_s, jnp.asarray(sizes, jnp.int32)), np.float64)
    b_deq = np.stack([np_dequantize(b_q[g], b_s[g], (128, 128)) for g in range(4)])
    exact = np_grouped_matmul(np_dequantize(a_q, a_s, (1, 128)), b_deq.transpose(0, 2, 1), sizes)
    assert np.max(np.abs(y - exact)) / np.max(np.abs(exact)) < 1e-5
    assert not y[sum(sizes):].any()

    padded = [0, 256, 0, 128]     # tgmm_fp8 wants 128-multiples; rows past 384 contribute nothing
    at_q, at_s = QUANTIZE_1X128(jnp.asarray(rng.normal(size=(K, 512)), jnp.float32))
    bt_q, bt_s = QUANTIZE_1X128(jnp.asarray(rng.normal(size=(N, 512)), jnp.float32))
    dw = np.asarray(TGMM_FP8(at_q, at_s, bt_q, bt_s, jnp.asarray(padded, jnp.int32)), np.float64)
    exact = np_tgmm(np_dequantize(at_q, at_s, (1, 128)).T, np_dequantize(bt_q, bt_s, (1, 128)).T, padded)
    assert np.max(np.abs(dw - exact)) / np.max(np.abs(exact)) < 1e-5
    assert not dw[0].any() and not dw[2].any()
    with pytest.raises(ValueError, match="multiple of 128"):
        reference.tgmm_fp8(at_q, at_s, bt_q, bt_s, jnp.asarray([0, 200, 0, 128], jnp.int32), out_dtype=jnp.float32)


@pytest.mark.parametrize("sizes", [[0, 130, 0, 100], [128, 1, 0, 171], [0, 0, 0, 0]])
def test_aligned_rows_start_every_group_at_a_multiple_of_128(sizes):
    M = 300
    layout = jax.jit(aligned_rows, static_argnums=1)(jnp.asarray(sizes, jnp.int32), M)
    padded = [-(-n // 128) * 128 for n in sizes]
    assert np.asarray(layout.group_sizes_E).tolist() == padded
    P = layout.source_N.shape[0]
    assert P % 128 == 0 and P >= sum(padded)
    x = np.arange(1, M + 1, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    x_al = np.asarray(gather_rows(jnp.asarray(x), layout))
    start, at = 0, 0
    for n, p in zip(sizes, padded):
        np.testing.assert_array_equal(x_al[at:at + n], x[start:start + n])
        assert not x_al[at + n:at + p].any()
        start, at = start + n, at + p
    assert not x_al[at:].any()


@pytest.mark.parametrize("op", [grouped_matmul, grouped_matmul_fp8])
def test_output_and_gradient_dtypes_follow_the_operands(op):
    """y and dx in x's dtype, dW in W's (W is cast to x's dtype for the product)."""
    x, w = jax.ShapeDtypeStruct((300, 200), jnp.bfloat16), jax.ShapeDtypeStruct((4, 200, 136), jnp.float32)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

    def value_and_grads(x, w, sizes):
        y, vjp = jax.vjp(lambda x, w: op(x, w, sizes), x, w)
        return (y, *vjp(jnp.ones_like(y)))

    y, dx, dw = jax.eval_shape(value_and_grads, x, w, sizes)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    assert (y.shape, dx.shape, dw.shape) == ((300, 136), (300, 200), (4, 200, 136))


def test_registry_names_unknown_and_unavailable_implementations(monkeypatch):
    x, w, sizes = jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2])
    monkeypatch.setitem(api._LAZY_IMPLEMENTATIONS, "gpu", "pallas_kernels.grouped_matmul.no_such_module")
    with pytest.raises(ImportError, match="impl='gpu' unavailable"):
        grouped_matmul(x, w, sizes, impl="gpu")
    with pytest.raises(ValueError, match="impl='nope'"):
        grouped_matmul_fp8(x, w, sizes, impl="nope")
    np.testing.assert_allclose(np.asarray(grouped_matmul(x, w, sizes, impl="reference")), 2.0)
