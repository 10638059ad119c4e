"""Dispatch/combine kernels (Pallas TPU and Pallas GPU/Triton, in interpret mode) against the plain-jnp reference:
layout, values and both gradients on random routings, fused FP8 quantization bit for bit, aligned groups; and
both kernel families lower for their real platforms from this CPU host."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import api, reference
from pallas_kernels.fp8 import quantize_1x128

E, T, D = 8, 12, 136   # D: one whole 128-column tile and a partial one
KERNELS = ("tpu", "gpu")


def routing(kind: str, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "distinct":        # what the router produces: k different experts per token
        experts = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    elif kind == "skewed":        # mostly experts 0 and 1; experts 5.. never used
        experts = np.where(rng.uniform(size=(T, k)) < 0.8, rng.integers(0, 2, (T, k)), rng.integers(0, 5, (T, k)))
    elif kind == "one_expert":    # every choice to expert 6; all other experts empty
        experts = np.full((T, k), 6)
    else:
        raise ValueError(kind)
    return jnp.asarray(experts, jnp.int32), jnp.asarray(rng.uniform(0.1, 2.0, size=(T, k)), jnp.float32)


def tokens(seed: int = 0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(100 + seed).normal(size=(T, D)), dtype)


def moe_like(dispatch, combine, x_TD, weights_TK, ct_TD):
    """dispatch → a nonlinear per-row 'expert' → combine, and the loss <out, ct> it feeds."""
    sent = dispatch(x_TD)
    y_ND = jnp.tanh(sent.x_ND) * 1.5
    out_TD = combine(y_ND, weights_TK, sent)
    return jnp.sum(out_TD * ct_TD), (sent, out_TD)


@functools.lru_cache(maxsize=None)
def run(impl: str, k: int, align: int = 1):
    """jit of (loss, (dispatched, out), (dx, dweights)) for one implementation; experts are an argument."""
    def f(x_TD, experts_TK, weights_TK, ct_TD):
        if impl == "definition":   # the plain jnp definition, differentiated by JAX
            dispatch = lambda x: reference.dispatch(x, experts_TK, E, align)
            combine = lambda y, w, s: reference.combine(y, w, s.order_N, jnp.float32)
        else:
            dispatch = lambda x: api.dispatch(x, experts_TK, E, impl=impl, align=align, interpret=True)
            combine = lambda y, w, s: api.combine(y, w, s.order_N, jnp.float32, row_TK=s.row_TK, impl=impl,
                                                  interpret=True)
        return jax.value_and_grad(lambda x, w: moe_like(dispatch, combine, x, w, ct_TD), (0, 1), has_aux=True)(
            x_TD, weights_TK)
    return jax.jit(f)


@pytest.fixture(autouse=True, scope="module")
def _cheap_compiles():   # these tests compare results, never time them
    previous = jax.config.values.get("jax_disable_most_optimizations", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# One compile per (impl, K); the routings of a K share it. Empty experts in every one but "distinct" K = 8.
ROUTINGS = {1: ("distinct",), 3: ("skewed", "one_expert"), 8: ("distinct", "skewed")}


# The reference rows run through the same vjp as the kernels; one K covers them.
@pytest.mark.parametrize("impl,k", [(impl, k) for impl in KERNELS for k in sorted(ROUTINGS)] + [("reference", 3)])
def test_matches_definition_values_and_gradients(impl, k):
    for kind in ROUTINGS[k]:
        experts, weights = routing(kind, k, seed=k)
        x, ct = tokens(k), tokens(k + 50)
        (loss, (sent, out)), (dx, dw) = run(impl, k)(x, experts, weights, ct)
        (loss_r, (sent_r, out_r)), (dx_r, dw_r) = run("definition", k)(x, experts, weights, ct)
        np.testing.assert_array_equal(sent.x_ND, sent_r.x_ND)
        np.testing.assert_array_equal(sent.order_N, sent_r.order_N)
        np.testing.assert_array_equal(sent.group_sizes_E, np.bincount(np.asarray(experts).ravel(), minlength=E))
        np.testing.assert_allclose(out, out_r, rtol=1e-6, atol=1e-6, err_msg=kind)
        np.testing.assert_allclose(dx, dx_r, rtol=1e-5, atol=1e-5, err_msg=f"dx {kind}")
        np.testing.assert_allclose(dw, dw_r, rtol=1e-5, atol=1e-5, err_msg=f"dweights {kind}")
        assert dw.dtype == weights.dtype and dx.dtype == x.dtype


@functools.lru_cache(maxsize=None)
def forward(impl: str, k: int):
    def f(x_TD, experts_TK, weights_TK):
        if impl == "definition":
            sent = reference.dispatch(x_TD, experts_TK, E)
            return sent.x_ND, reference.combine(sent.x_ND, weights_TK, sent.order_N, jnp.float32)
        sent = api.dispatch(x_TD, experts_TK, E, impl=impl, interpret=True)
        return sent.x_ND, api.combine(sent.x_ND, weights_TK, sent.order_N, jnp.float32, impl=impl, interpret=True)
    return jax.jit(f)


@pytest.mark.parametrize("impl", KERNELS)
def test_top_k_5_bfloat16_forward(impl):
    """One more K, forward, in bf16: rows copied exactly, the K products summed in float32 (a bf16 sum would
    miss the 1e-6 tolerance)."""
    k = 5
    experts, weights = routing("skewed", k, seed=k)
    x, weights = tokens(k, jnp.bfloat16), weights.astype(jnp.bfloat16)
    x_ND, out = forward(impl, k)(x, experts, weights)
    x_ND_r, out_r = forward("definition", k)(x, experts, weights)
    assert x_ND.dtype == jnp.bfloat16 and out.dtype == jnp.float32
    np.testing.assert_array_equal(x_ND, x_ND_r)
    np.testing.assert_allclose(out, out_r, rtol=1e-6, atol=1e-6)
    default = jax.eval_shape(lambda y, w, o: api.combine(y, w, o, impl=impl, interpret=True), x_ND, weights,
                             jnp.zeros(x_ND.shape[0], jnp.int32))
    assert default.dtype == jnp.bfloat16 and default.shape == (T, D)


@pytest.mark.parametrize("impl", ("reference",) + KERNELS)
def test_aligned_groups_are_multiples_and_combine_inverts_them(impl):
    align, k = 8, 3
    experts, weights = routing("skewed", k, seed=7)
    x, ct = tokens(7), tokens(8)
    (_, (sent, out)), (dx, dw) = run(impl, k, align)(x, experts, weights, ct)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=E)
    sizes, offsets, order = (np.asarray(a) for a in (sent.group_sizes_E, sent.group_offsets_E, sent.order_N))
    np.testing.assert_array_equal(sizes, -(-counts // align) * align)
    np.testing.assert_array_equal(offsets, np.cumsum(sizes) - sizes)
    assert sent.x_ND.shape[0] == api.padded_rows(T * k, E, align) >= sizes.sum()
    xs, flat = np.asarray(sent.x_ND), np.asarray(experts).ravel()
    real = np.zeros(len(order), bool)
    for e in range(E):   # the expert's rows in token order, then zero rows up to the aligned size
        rows = slice(offsets[e], offsets[e] + counts[e])
        real[rows] = True
        np.testing.assert_array_equal(order[rows], np.flatnonzero(flat == e))
        np.testing.assert_array_equal(xs[rows], np.asarray(x)[order[rows] // k])
        assert not xs[offsets[e] + counts[e]:offsets[e] + sizes[e]].any()
    assert not xs[~real].any() and (order[~real] == T * k).all()   # padding: zero rows, one past the last pair
    np.testing.assert_array_equal(np.sort(np.asarray(sent.row_TK).ravel()), np.flatnonzero(real))
    # combine inverts the padded layout: the unaligned definition's values and gradients.
    (_, (_, out_r)), (dx_r, dw_r) = run("definition", k)(x, experts, weights, ct)
    np.testing.assert_allclose(out, out_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ("reference",) + KERNELS)
def test_fused_fp8_quantization_is_bit_exact(impl):
    experts, _ = routing("skewed", 2, seed=9)
    rng = np.random.default_rng(9)   # magnitudes over many binades; one token all zeros
    x = (rng.normal(size=(T, D)) * np.exp2(rng.integers(-20, 20, size=(T, 1)))).astype(np.float32)
    x[3] = 0.0
    x = jnp.asarray(x, jnp.bfloat16)
    both = jax.jit(lambda x, e: [api.dispatch(x, e, E, impl=impl, align=4, quantize=True, power_of_two=p2,
                                              interpret=True) for p2 in (False, True)])(x, experts)
    for power_of_two, sent in zip((False, True), both):
        want_q, want_s = jax.jit(quantize_1x128, static_argnums=1)(sent.x_ND, power_of_two)
        assert sent.x_q_ND.dtype == jnp.float8_e4m3fn and sent.scale_NDb.shape == (sent.x_ND.shape[0], 2)
        np.testing.assert_array_equal(np.asarray(sent.x_q_ND).view(np.uint8), np.asarray(want_q).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(sent.scale_NDb).view(np.uint32), np.asarray(want_s).view(np.uint32))
    order = np.asarray(both[0].order_N)   # padding rows (order T·K) are zero
    want_x = np.where((order < T * 2)[:, None], np.asarray(x)[np.minimum(order // 2, T - 1)], 0)
    np.testing.assert_array_equal(both[0].x_ND, want_x)


def lowering_args():
    experts, weights = routing("skewed", 2)
    return tokens(0, jnp.bfloat16), experts, weights, tokens(1)


@pytest.mark.parametrize("impl,platform,marker", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu", "tpu_custom_call")])
def test_kernels_lower_for_their_platform(impl, platform, marker):
    """Forward, both backward kernels and the fused FP8 gather go through the real Pallas lowering."""
    def f(x_TD, experts_TK, weights_TK, ct_TD):
        def loss(x, w):
            sent = api.dispatch(x, experts_TK, E, impl=impl, align=16, quantize=True)
            out = api.combine(sent.x_ND * 2, w, sent.order_N, jnp.float32, row_TK=sent.row_TK, impl=impl)
            return jnp.sum(out * ct_TD) + sent.scale_NDb.sum() + sent.x_q_ND.astype(jnp.float32).sum()
        return jax.value_and_grad(loss, (0, 1))(x_TD, weights_TK)
    text = jax.jit(f).trace(*lowering_args()).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 4   # gather (+FP8), weighted combine, combine backward, unweighted combine


def test_bad_arguments_name_the_field():
    x, experts = jnp.ones((4, 8)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="align=0"):
        api.dispatch(x, experts, 2, align=0)
    with pytest.raises(ValueError, match=r"expert_idx_TK \(3, 2\)"):
        api.dispatch(x, experts[:3], 2)
    y_ND, order_N = jnp.ones((8, 8)), jnp.arange(8)
    with pytest.raises(ValueError, match=r"row_TK \(2, 4\)"):
        api.combine(y_ND, jnp.ones((4, 2)), order_N, row_TK=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"order_N \(7,\)"):
        api.combine(y_ND, jnp.ones((4, 2)), order_N[:7])
    with pytest.raises(ValueError, match="impl='cuda'"):
        api.combine(y_ND, jnp.ones((4, 2)), order_N, row_TK=jnp.zeros((4, 2), jnp.int32), impl="cuda")
