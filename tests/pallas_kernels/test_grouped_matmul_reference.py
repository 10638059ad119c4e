"""Reference grouped matmul against a per-group NumPy loop, including its gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.grouped_matmul import reference

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
