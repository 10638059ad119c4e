"""The MoE layer on the Pallas kernels equals the reference layer (forward, and gradients with respect to the
input and every parameter), with no change to the model: the TPU kernels (interpret mode) in float32 and with
the routed experts in FP8 (the float32 TPU kernels are held to the reference in tests/pallas_kernels), and the GPU kernels (Mosaic GPU grouped matmul + Pallas GPU dispatch, interpret
mode) in bf16, all resolved from the config (model.kernels / model.kernel_target) into the layer's KernelSet."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import kernels
from dsv3_jax.model.moe.layer import MoE
from dsv3_jax.config.presets import PRESETS

CONFIG = dataclasses.replace(PRESETS["tiny"], n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1)


def loss_and_grads(config, x_BTD, variables):
    layer = MoE(config, kernels.resolve(config, jax.devices()[:1]))

    def loss(params, x):
        out, _ = layer.apply({**variables, "params": params}, x)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x_BTD)
    return out, grads


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.mark.parametrize("name, config, target, tol", [
    ("tpu-fp8", dataclasses.replace(CONFIG, fp8=True), "tpu:interpret", 1e-5),
    ("gpu-bf16", dataclasses.replace(CONFIG, dtype="bfloat16"), "hopper:interpret", 2e-2),
])
def test_kernels_equal_the_reference_layer(name, config, target, tol):
    x_BTD = jax.random.normal(jax.random.key(1), (1, 16, config.dim), jnp.float32).astype(config.jnp_dtype)
    variables = MoE(config, kernels.REFERENCE).init(jax.random.key(0), x_BTD)
    ref_out, ref_grads = loss_and_grads(config.replace(kernels="reference"), x_BTD, variables)
    out, grads = loss_and_grads(config.replace(kernels="pallas", kernel_target=target), x_BTD, variables)
    assert max_rel(out, ref_out) < tol
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.shape == want.shape and max_rel(got, want) < tol


def test_fp8_routed_experts_stay_close_to_bf16_compute():
    x_BTD = jax.random.normal(jax.random.key(2), (2, 32, CONFIG.dim), jnp.float32)
    variables = MoE(CONFIG, kernels.REFERENCE).init(jax.random.key(0), x_BTD)
    exact, _ = loss_and_grads(CONFIG, x_BTD, variables)
    fp8, _ = loss_and_grads(dataclasses.replace(CONFIG, fp8=True), x_BTD, variables)
    x, y = np.asarray(fp8, np.float64), np.asarray(exact, np.float64)
    # DeepGEMM's metric; three chained FP8 GEMMs (gate, up, down) at ~6.5e-4 each measure ~2e-3 here
    assert 1 - 2 * np.sum(x * y) / np.sum(x * x + y * y) < 5e-3
    assert not np.array_equal(x, y)                                  # FP8 really ran
