"""Kernels XLA cannot partition run per batch shard (sharding.per_shard): on 4 simulated CPU devices, the MoE layer
on the TPU kernels (interpret mode) under a data × fsdp mesh opens a shard_map over the batch axes and equals the
unsharded layer, values and gradients (expert weights included: their gradient is summed over the shards)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.fast_compile import cheap_compiles, cpu_devices  # noqa: F401  (fixtures; cheap_compiles is autouse)


def test_moe_kernels_run_per_batch_shard_and_equal_the_unsharded_layer(cpu_devices):
    from dsv3_jax import kernels
    from dsv3_jax.config.presets import PRESETS
    from dsv3_jax.model.moe.layer import MoE
    from sharding.mesh import build_mesh

    config = dataclasses.replace(PRESETS["tiny"], n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1,
                                 kernels="pallas", kernel_target="tpu:interpret")
    x_BTD = jax.random.normal(jax.random.key(1), (4, 8, config.dim), jnp.float32)
    layer = MoE(config, kernels.resolve(config, cpu_devices[:1]))   # the TPU kernels, interpreted
    variables = MoE(config, kernels.REFERENCE).init(jax.random.key(0), x_BTD)

    def loss(params, x):
        out, _ = layer.apply({**variables, "params": params}, x)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, want_out), want_grads = grad(variables["params"], x_BTD)

    mesh = build_mesh({"data": 2, "fsdp": 2}, cpu_devices[:4])
    with jax.set_mesh(mesh):
        x = jax.device_put(x_BTD, NamedSharding(mesh, P(("data", "fsdp"))))
        text = grad.lower(variables["params"], x).as_text()
        (_, out), grads = grad(variables["params"], x)
    assert "sdy.manual_computation" in text or "shard_map" in text, "the layer opened no shard_map"
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6, err_msg="output on data=2 × fsdp=2")
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(want_grads)]
    got_leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(got_leaves) == len(want_leaves), f"{len(got_leaves)} gradient leaves, {len(want_leaves)} unsharded"
    for path, got, want in zip(paths, got_leaves, want_leaves):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"gradient (params, x){path}")


def test_without_a_mesh_the_function_runs_as_it_is():
    """Without a mesh (or on one device) no shard_map is traced: the function comes back unchanged."""
    from sharding.per_shard import on_batch_shards

    assert on_batch_shards(jnp.sin, 1) is jnp.sin

