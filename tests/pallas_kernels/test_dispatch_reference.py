"""Reference dispatch → grouped matmul → combine against a naive per-token loop, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import combine, dispatch
from pallas_kernels.grouped_matmul import grouped_matmul

E, T, D, F = 8, 24, 16, 12


def moe_apply(x_TD, w_EDF, experts_TK, weights_TK):
    sent = dispatch(x_TD, experts_TK, w_EDF.shape[0])
    y_NF = grouped_matmul(sent.x_ND, w_EDF, sent.group_sizes_E)
    return combine(y_NF, weights_TK, sent.order_N, jnp.float32)


def naive_jnp(x_TD, w_EDF, experts_TK, weights_TK):
    return jnp.einsum("tk,td,tkdf->tf", weights_TK, x_TD, w_EDF[experts_TK])


def naive_loop(x, w, experts, weights):
    out = np.zeros((x.shape[0], w.shape[2]), np.float64)
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            out[t] += weights[t, k] * (x[t].astype(np.float64) @ w[experts[t, k]].astype(np.float64))
    return out


def routing(kind: str, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "distinct":        # what the router produces: k different experts per token
        experts = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    elif kind == "skewed":        # almost everything to experts 0 and 1, experts 5.. never used
        experts = np.where(rng.uniform(size=(T, k)) < 0.85, rng.integers(0, 2, (T, k)), rng.integers(0, 5, (T, k)))
    elif kind == "one_expert":    # every choice of every token to expert 6; all others empty
        experts = np.full((T, k), 6)
    else:
        raise ValueError(kind)
    return experts.astype(np.int32), rng.uniform(0.1, 2.0, size=(T, k)).astype(np.float32)


CASES = [("distinct", k) for k in range(1, 9)] + [("skewed", 3), ("skewed", 8), ("one_expert", 1), ("one_expert", 4)]


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, D)).astype(np.float32), rng.normal(size=(E, D, F)).astype(np.float32)


@pytest.mark.parametrize("kind,k", CASES)
def test_pipeline_matches_per_token_loop(kind, k):
    experts, weights = routing(kind, k)
    x, w = data()
    y = jax.jit(moe_apply)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(experts), jnp.asarray(weights))
    assert y.shape == (T, F) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), naive_loop(x, w, experts, weights), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind,k", [("distinct", 1), ("distinct", 4), ("distinct", 8), ("skewed", 3),
                                    ("one_expert", 2)])
def test_pipeline_gradients_match_naive(kind, k):
    experts, weights = routing(kind, k, seed=1)
    x, w = data(seed=1)
    r = jax.random.normal(jax.random.PRNGKey(0), (T, F))
    experts = jnp.asarray(experts)

    def grads(f):
        loss = lambda x, w, wt: jnp.sum(f(x, w, experts, wt) * r)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(weights))

    got, want = grads(moe_apply), grads(naive_jnp)
    for name, g, n in zip(("x", "W", "weights"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(n), rtol=1e-4, atol=1e-4, err_msg=name)
    unused = sorted(set(range(E)) - set(np.asarray(experts).ravel().tolist()))
    for e in unused:   # an empty expert gets exactly zero gradient
        assert not np.asarray(got[1][e]).any()


def test_dispatch_layout():
    experts, _ = routing("skewed", 3, seed=2)
    x, _ = data(seed=2)
    sent = jax.jit(dispatch, static_argnums=2)(jnp.asarray(x), jnp.asarray(experts), E)
    order = np.asarray(sent.order_N)
    flat = experts.reshape(-1)
    # order is a permutation sorting the (token, choice) pairs by expert, stably.
    np.testing.assert_array_equal(np.sort(order), np.arange(T * 3))
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(sent.group_sizes_E), np.bincount(flat, minlength=E))
    assert sent.group_sizes_E.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(sent.x_ND), x[order // 3])
    # Rows are contiguous by expert.
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=E))])
    for e in range(E):
        assert (flat[order[bounds[e]:bounds[e + 1]]] == e).all()


def test_combine_inverts_dispatch():
    """combine(dispatch(x)) with weights w gives Σ_k w_tk · x_t (the identity expert)."""
    experts, weights = routing("distinct", 5, seed=3)
    x, _ = data(seed=3)
    sent = dispatch(jnp.asarray(x), jnp.asarray(experts), E)
    y = combine(sent.x_ND, jnp.asarray(weights), sent.order_N)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x * weights.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_combine_out_dtype_and_float32_accumulation():
    x = jnp.full((4, 2), 1.0, jnp.bfloat16)
    experts = jnp.zeros((4, 8), jnp.int32)
    weights = jnp.full((4, 8), 1.0 / 3.0, jnp.bfloat16)
    sent = dispatch(x, experts, 2)
    y = combine(sent.x_ND, weights, sent.order_N, jnp.float32)
    assert y.dtype == jnp.float32
    # 8 · bf16(1/3): summed in float32, the only rounding is the bf16 weight itself.
    np.testing.assert_allclose(np.asarray(y), 8 * float(jnp.bfloat16(1 / 3)), rtol=1e-6)
    assert combine(sent.x_ND, weights, sent.order_N).dtype == jnp.bfloat16


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl='pallas_x'"):
        dispatch(jnp.ones((2, 2)), jnp.zeros((2, 1), jnp.int32), 2, impl="pallas_x")
