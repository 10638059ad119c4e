"""Kernels XLA cannot partition run per batch shard (sharding.per_shard): on 4 simulated CPU devices, the MoE layer
on the TPU kernels (interpret mode) under a data × fsdp mesh opens a shard_map over the batch axes and equals the
unsharded layer, values and gradients (expert weights included: their gradient is summed over the shards)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dsv3_jax.model.moe.layer import MoE
    from dsv3_jax.config.presets import PRESETS
    from sharding.mesh import build_mesh
    from sharding.per_shard import on_batch_shards

    config = dataclasses.replace(PRESETS["tiny"], n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1,
                                 kernels="pallas", kernel_target="tpu:interpret")
    x_BTD = jax.random.normal(jax.random.key(1), (4, 8, config.dim), jnp.float32)
    variables = MoE(config).init(jax.random.key(0), x_BTD)

    def loss(params, x):
        out, _ = MoE(config).apply({**variables, "params": params}, x)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, want_out), want_grads = grad(variables["params"], x_BTD)

    mesh = build_mesh({"data": 2, "fsdp": 2})
    with jax.set_mesh(mesh):
        x = jax.device_put(x_BTD, NamedSharding(mesh, P(("data", "fsdp"))))
        text = grad.lower(variables["params"], x).as_text()
        (_, out), grads = grad(variables["params"], x)
    assert "sdy.manual_computation" in text or "shard_map" in text, "the layer opened no shard_map"
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # Without a mesh (or on one device) the function runs as it is: no shard_map is traced.
    assert on_batch_shards(jnp.sin, 1) is jnp.sin
    print("ok")
""")


def test_moe_kernels_run_per_batch_shard_and_equal_the_unsharded_layer():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
