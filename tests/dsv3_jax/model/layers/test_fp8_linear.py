"""The FP8 linear (custom_vjp): output and both gradients against the float32 linear by DeepGEMM's metric, the
dtypes of its gradients, and the tiny model with `model.fp8=true` (forward + backward finite, loss within 1%
of the same weights without FP8; same parameters either way; the output head stays high precision)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.layers.fp8_linear import fp8_linear
from dsv3_jax.kernels import REFERENCE
from dsv3_jax.model.layers.linear import make_linear
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.config.presets import PRESETS


def deepgemm_diff(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 1.0 - 2.0 * np.sum(x * y) / np.sum(x * x + y * y)


def value_and_grads(linear, x, w, r):
    def loss(x, w):
        y = linear(x, w)
        return jnp.sum(y.astype(jnp.float32) * r), y
    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return y, dx, dw


@pytest.mark.parametrize("impl, power_of_two", [("reference", False), ("reference", True), ("tpu", False)])
def test_output_and_gradients_match_the_float32_linear(impl, power_of_two):
    kx, kw, kr = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (3, 70, 300))           # M = 210, K = 300, N = 130: nothing aligned to 128
    w = jax.random.normal(kw, (300, 130)) * 0.05
    r = jax.random.normal(kr, (3, 70, 130))
    fp8 = value_and_grads(lambda x, w: fp8_linear(x, w, power_of_two=power_of_two, impl=impl, interpret=True), x, w, r)
    f32 = value_and_grads(lambda x, w: jnp.dot(x, w, precision="highest"), x, w, r)
    for name, a, b in zip(("y", "dx", "dw"), fp8, f32):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert deepgemm_diff(a, b) < 1e-3, (name, deepgemm_diff(a, b))


def test_gradient_dtypes_follow_the_inputs():
    x = jnp.ones((5, 130), jnp.bfloat16)
    w = jnp.full((130, 3), 0.5, jnp.float32)
    y, dx, dw = value_and_grads(lambda x, w: fp8_linear(x, w), x, w, jnp.ones((5, 3)))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), 65.0)
    np.testing.assert_allclose(np.asarray(dw), 5.0)


CONFIG = PRESETS["tiny"].replace(n_layers=2, vocab_size=64, num_mtp_modules=0)


def random_variables(config):
    """Variables shaped by the model's init (traced only, nothing compiled): Normal(0.02) weights, unit norms."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        DeepSeekV3(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * 0.02, leaf.dtype)
    return shapes, jax.tree_util.tree_map_with_path(fill, shapes)


def test_tiny_model_runs_fp8_close_to_the_unquantized_model():
    fp8_config = CONFIG.with_overrides("fp8=true")
    assert make_linear(fp8_config, REFERENCE, 8, ("embed", "heads"), "wq").fp8
    assert not make_linear(fp8_config, REFERENCE, 8, ("embed", "vocab"), "lm_head", jnp.float32, allow_fp8=False).fp8
    shapes, variables = random_variables(CONFIG)
    assert random_variables(fp8_config)[0] == shapes            # the same parameters with and without FP8
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, CONFIG.vocab_size)

    def loss(params, config):
        logits = DeepSeekV3(config).apply({**variables, "params": params}, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    loss_fp8, grads_fp8 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], fp8_config)
    loss_ref = jax.jit(loss, static_argnums=1)(variables["params"], CONFIG)
    assert all(bool(jnp.isfinite(g).all()) and bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads_fp8))
    assert abs(float(loss_fp8) - float(loss_ref)) < 0.01 * abs(float(loss_ref)), (float(loss_fp8), float(loss_ref))
