"""TPU Pallas grouped matmuls in interpret mode against the reference, on routings that stress the visit list
(skewed, empty first / middle / last groups, groups that are not block multiples, several groups in one row tile,
rows past the total): the three F32 kernels; forward and both gradients through `grouped_matmul` in BF16, also
against a float64 oracle; the FP8 recipe (`grouped_matmul_fp8`) against the reference on the same FP8 inputs and
against the unquantized product; and the Mosaic TPU lowering of each kernel. Each function compiles once (group
sizes are traced)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import quantize_1x128, quantize_128x128
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_fp8
from pallas_kernels.grouped_matmul import reference, tpu
from tests.pallas_kernels.test_grouped_matmul_reference import np_tgmm

# At the api's default tiles (BlockSizes()), K = 384 gives the FP8 forward three 128-wide K steps and the data and
# weight gradients 256-wide tiles of two 128 sub-blocks each; 300 rows make two 256-row tiles. The kernel tests
# use 128 everywhere: three row tiles, three K steps.
M, K, N, G = 300, 384, 200, 4
BLOCKS = tpu.BlockSizes(128, 128, 128)
ROUTINGS = {
    "skewed": [250, 20, 5, 25],
    "empty_first_and_middle": [0, 140, 0, 160],
    "empty_last_rows_past_total": [37, 100, 91, 0],    # 228 rows of 300
    "not_block_multiples": [1, 127, 129, 43],
    "many_in_one_tile": [5, 3, 2, 7],                  # 17 rows: four groups in tile 0, tiles 1-2 past the total
    "all_empty": [0, 0, 0, 0],
}


def kernel(module, name, out_dtype=jnp.float32):
    extra = {"block_sizes": BLOCKS, "interpret": True} if module is tpu else {}
    return jax.jit(functools.partial(getattr(module, name), out_dtype=out_dtype, **extra))


KERNELS = {(m.__name__.rsplit(".", 1)[1], name): kernel(m, name) for m in (reference, tpu)
           for name in ("gmm", "gmm_t", "tgmm")}


def np_gmm(x, w_GKN, sizes):
    y, start = np.zeros((x.shape[0], w_GKN.shape[2])), 0
    for g, n in enumerate(sizes):
        y[start:start + n] = np.asarray(x[start:start + n], np.float64) @ np.asarray(w_GKN[g], np.float64)
        start += n
    return y



def deepgemm_diff(x, y):
    """1 - 2Σxy / Σ(x² + y²) in float64 (0 for identical)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 1.0 - 2.0 * np.sum(x * y) / np.sum(x * x + y * y)


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    # Rows of different magnitudes so the FP8 per-tile scales matter.
    x = rng.normal(size=(M, K)) * np.exp(rng.normal(size=(M, 1)))
    w = rng.normal(size=(G, K, N)) * np.exp(0.5 * rng.normal(size=(G, 1, N)))
    dy = rng.normal(size=(M, N))
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, w, dy))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_kernels_match_reference(operands, routing):
    x, w, dy = operands
    sizes = jnp.asarray(ROUTINGS[routing], jnp.int32)
    total = int(sizes.sum())
    for name, args in [("gmm", (x, w)), ("gmm_t", (dy, w)), ("tgmm", (x, dy))]:
        ref = np.asarray(KERNELS["reference", name](*args, sizes))
        out = np.asarray(KERNELS["tpu", name](*args, sizes))
        assert out.shape == ref.shape, name
        assert max_rel(out, ref) < 1e-5 if ref.any() else not out.any(), name
        if name == "tgmm":   # empty groups: exactly zero weight gradient
            assert all(not out[g].any() for g, n in enumerate(ROUTINGS[routing]) if n == 0)
        else:                # rows past the total: exactly zero
            assert not out[total:].any(), name


@functools.cache
def _value_and_grads(impl: str, fp8: bool = False):
    """jit of (y, dx, dw) of grouped_matmul(_fp8) with cotangent dy, compiled once per impl and dtype."""
    op = grouped_matmul_fp8 if fp8 else grouped_matmul

    def f(x, w, sizes, dy):
        y, vjp = jax.vjp(lambda x, w: op(x, w, sizes, impl=impl, interpret=True), x, w)
        return (y, *vjp(dy.astype(y.dtype)))

    return jax.jit(f)


def oracle(x, w, dy, sizes):
    """float64 (y, dx, dw) of the grouped matmul."""
    return (np_gmm(x, w, sizes), np_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), sizes),
            np_tgmm(x, dy, sizes))


@pytest.mark.parametrize("routing", ["not_block_multiples", "empty_last_rows_past_total"])
def test_bf16_gradients_match_reference_and_float64_oracle(operands, routing):
    x, w, dy = (a.astype(jnp.bfloat16) for a in operands)
    sizes = ROUTINGS[routing]
    outs = {impl: _value_and_grads(impl)(x, w, jnp.asarray(sizes, jnp.int32), dy) for impl in ("reference", "tpu")}
    assert all(a.dtype == jnp.bfloat16 for a in outs["tpu"])
    for name, out, ref, exact in zip(("y", "dx", "dw"), outs["tpu"], outs["reference"], oracle(x, w, dy, sizes)):
        out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        # Both accumulate in float32 and round once to bf16: equal up to one bf16 step (2^-8 relative).
        np.testing.assert_allclose(out, ref, rtol=2 ** -7, atol=1e-5 * np.abs(exact).max(), err_msg=name)
        np.testing.assert_allclose(out, exact, rtol=2 ** -7, atol=1e-4 * np.abs(exact).max(), err_msg=name)
    total = sum(sizes)
    assert not np.asarray(outs["tpu"][0])[total:].any() and not np.asarray(outs["tpu"][1])[total:].any()


@pytest.mark.parametrize("routing", ["skewed", "empty_first_and_middle", "empty_last_rows_past_total"])
def test_fp8_recipe_matches_reference_and_the_unquantized_product(operands, routing):
    """Both impls quantize identically, so gmm_fp8 (forward, data gradient) and tgmm_fp8 (weight gradient on the
    group-aligned rows) see the same FP8 inputs in both."""
    x, w, dy = operands
    sizes = ROUTINGS[routing]
    outs = {impl: _value_and_grads(impl, fp8=True)(x, w, jnp.asarray(sizes, jnp.int32), dy)
            for impl in ("reference", "tpu")}
    for name, out, ref, exact in zip(("y", "dx", "dw"), outs["tpu"], outs["reference"], oracle(x, w, dy, sizes)):
        assert max_rel(out, ref) < 1e-5, name
        assert deepgemm_diff(out, exact) < 1e-3 and deepgemm_diff(ref, exact) < 1e-3, name
    y, dx, dw = (np.asarray(a) for a in outs["tpu"])
    assert not y[sum(sizes):].any() and not dx[sum(sizes):].any()
    assert all(not dw[g].any() for g, n in enumerate(sizes) if n == 0)


def test_fp8_kernels_at_scale_blocks_past_the_first():
    """At 128-wide tiles the FP8 kernels read their scales 8 blocks of 128 at a time (a (bm, 128) block of a's
    column scales, an (8, bn) block of b's row scales): 9 blocks of the contraction cross into the second."""
    rng = np.random.default_rng(5)
    quantize = jax.jit(quantize_1x128)
    a_q, a_s = quantize(jnp.asarray(rng.normal(size=(M, 1152)) * np.exp(rng.normal(size=(M, 1))), jnp.float32))
    b = rng.normal(size=(2, 128, 1152)) * np.exp(rng.normal(size=(2, 1, 1152)))
    b_q, b_s = jax.jit(jax.vmap(quantize_128x128))(jnp.asarray(b, jnp.float32))
    sizes = jnp.asarray([120, 150], jnp.int32)
    at_q, at_s = quantize(jnp.asarray(rng.normal(size=(256, 1152)) * np.exp(rng.normal(size=(1, 1152))), jnp.float32))
    bt_q, bt_s = quantize(jnp.asarray(rng.normal(size=(128, 1152)), jnp.float32))
    padded = jnp.asarray([256, 0, 640, 256], jnp.int32)
    for name, args in [("gmm_fp8", (a_q, a_s, b_q, b_s, sizes)), ("tgmm_fp8", (at_q, at_s, bt_q, bt_s, padded))]:
        ref = getattr(reference, name)(*args, out_dtype=jnp.float32)
        out = getattr(tpu, name)(*args, out_dtype=jnp.float32, interpret=True, block_sizes=BLOCKS)
        assert max_rel(out, ref) < 1e-5, name


def test_kernels_lower_for_tpu():
    """Pallas -> Mosaic lowering of every kernel at the default tiles (runs on a CPU host, catches unsupported
    ops and block shapes; Mosaic's own compile needs a TPU)."""
    spec = jax.ShapeDtypeStruct
    bf16, f32, f8, i32 = jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn, jnp.int32
    x, w, dy, sizes = spec((M, K), bf16), spec((G, K, N), bf16), spec((M, N), bf16), spec((G,), i32)
    Kb, Nb = -(-K // 128), -(-N // 128)
    cases = {
        tpu._gmm: (x, w, sizes), tpu._gmm_t: (dy, w, sizes), tpu._tgmm: (x, dy, sizes),
        tpu._gmm_fp8: (spec((M, K), f8), spec((M, Kb), f32), spec((G, N, K), f8), spec((G, Nb, Kb), f32), sizes),
        tpu._tgmm_fp8: (spec((K, 512), f8), spec((K, 4), f32), spec((N, 512), f8), spec((N, 4), f32), sizes),
    }
    for fn, args in cases.items():
        traced = fn.trace(*args, out_dtype=jnp.dtype(jnp.bfloat16), interpret=False, bs=tpu.BlockSizes())
        assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_bad_input_is_rejected_with_the_tensor_named():
    sizes = jnp.asarray([2, 2], jnp.int32)
    with pytest.raises(ValueError, match="the weight"):
        tpu.gmm(jnp.ones((4, 8)), jnp.ones((2, 9, 3)), sizes, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="group_sizes_E"):
        tpu.gmm(jnp.ones((4, 8)), jnp.ones((2, 8, 3)), jnp.ones((3,), jnp.int32), out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="x and dy"):
        tpu.tgmm(jnp.ones((4, 8)), jnp.ones((5, 3)), sizes, out_dtype=jnp.float32)
    a_q, a_s = jnp.zeros((8, 256), jnp.float8_e4m3fn), jnp.ones((8, 2))
    with pytest.raises(ValueError, match="multiple of 128"):
        tpu.tgmm_fp8(a_q, a_s, a_q, a_s, jnp.asarray([100, 28], jnp.int32), out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="BlockSizes.k"):
        tpu.BlockSizes(k=100)
