"""Decoding with weights kept as FP8 (float8_e4m3fn + 128x128 block scales): each kept Linear is the FP8 matmul
of its 1x128-quantised input with the stored weight (DeepGEMM's metric against the unquantised input,
1 - 2<x,y>/(|x|^2 + |y|^2), < 1e-3 per GEMM), and the model equals the dequantised model fed FP8-rounded Linear
inputs: the activations' quantisation is the only difference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model import fp8_weights
from dsv3_jax.infer import forward_with_cache, init_cache
from dsv3_jax.kernels import REFERENCE
from dsv3_jax.model.layers.linear import Linear, make_linear
from dsv3_jax.model.moe.layer import EXPERT_WEIGHTS
from pallas_kernels.fp8 import dequantize, quantize_1x128, quantize_128x128
from tests.dsv3_jax.infer.test_infer import CACHE_LEN, CONFIG, random_variables

# Some kernels span more than one 128x128 block (the dense MLP: 64 x 200 and 200 x 64), with cropped edge blocks.
FP8_CONFIG = CONFIG.replace(intermediate_size=200)


def deepgemm_diff(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def quantize_weights(params: dict) -> tuple[dict, dict]:
    """(params with Linear kernels and routed experts as FP8 + scales, the same params dequantised)."""
    blocks = jax.vmap  # stacked layers / experts: quantise each (K, N) matrix on its own

    def quantize(w):
        fn = quantize_128x128
        for _ in range(w.ndim - 2):
            fn = blocks(fn)
        return fn(w)

    fp8, real = {}, {}
    for key, value in params.items():
        if isinstance(value, dict) and key != "router":
            fp8[key], real[key] = quantize_weights(value)
        elif key == "kernel" or key in EXPERT_WEIGHTS:
            q, s = quantize(value)
            fp8[key], fp8[key + fp8_weights.SCALE_SUFFIX] = q, s
            real[key] = dequantize(q, s, (128, 128), value.dtype)
        else:
            fp8[key] = real[key] = value
    return fp8, real


@pytest.fixture(scope="module")
def models():
    variables = random_variables(FP8_CONFIG)
    fp8, real = jax.jit(quantize_weights)(variables["params"])
    return {"params": fp8, "moe_bias": variables["moe_bias"]}, {"params": real, "moe_bias": variables["moe_bias"]}


def quantise_linear_inputs(next_fun, args, kwargs, context):
    """A flax interceptor: every Linear's input rounded through its 1x128 FP8 quantisation."""
    if isinstance(context.module, Linear) and context.method_name == "__call__":
        x = args[0]
        x_q, x_s = quantize_1x128(x.reshape(-1, x.shape[-1]))
        args = (dequantize(x_q, x_s, (1, 128)).reshape(x.shape).astype(x.dtype),) + args[1:]
    return next_fun(*args, **kwargs)


def test_kept_linear_is_the_fp8_matmul_of_its_quantised_input():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 200))
    w = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (200, 300))
    q, s = quantize_128x128(w)
    assert s.shape == (2, 3)
    y = make_linear(FP8_CONFIG, REFERENCE, 300, ("mlp", "embed"), "down").apply(
        {"params": {"kernel": q, "kernel_scale": s}}, x)
    x_q, x_s = quantize_1x128(x.reshape(-1, 200))
    expected = dequantize(x_q, x_s, (1, 128)) @ dequantize(q, s, (128, 128))
    np.testing.assert_allclose(y.reshape(-1, 300), expected, rtol=1e-5, atol=1e-6)
    plain = x @ dequantize(q, s, (128, 128))
    assert 0 < deepgemm_diff(y, plain) < 1e-3   # only the activations' quantisation separates them


def test_fp8_decoding_matches_the_dequantised_model(models):
    """Absorbed-MLA decoding of 7 tokens (the decode step's code path, all positions at once). The FP8 model
    equals the dequantised one with each Linear's input rounded through FP8, up to float32 summation order and
    the few activations it tips over an FP8 rounding boundary (diff 2e-6); against the plain dequantised model
    the activations' quantisation, compounded over the layers, gives 5.4e-3 on this random model."""
    fp8, real = models
    assert fp8["params"]["moe_layers"]["moe"]["experts_gate"].dtype == jnp.float8_e4m3fn
    assert fp8["params"]["dense_layers"]["mlp"]["up"]["kernel_scale"].shape == (1, 1, 2)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, FP8_CONFIG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))

    def logits(variables, interceptor=None):
        forward = jax.jit(lambda v, c: forward_with_cache(FP8_CONFIG, v, tokens, positions, c)[0])  # own trace
        cache = init_cache(FP8_CONFIG, 2, CACHE_LEN)
        if interceptor is None:
            return np.asarray(forward(variables, cache))
        with nn.intercept_methods(interceptor):
            return np.asarray(forward(variables, cache))

    got, plain = logits(fp8), logits(real)
    rounded = logits(real, quantise_linear_inputs)
    assert np.abs(plain).max() > 0.1
    same, diff = deepgemm_diff(got, rounded), deepgemm_diff(got, plain)
    assert same < 1e-4 and same < diff / 100, (same, diff)
    assert diff < 1e-2, diff
