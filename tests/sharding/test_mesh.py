"""Meshes from axis sizes, and a data-parallel train step on 8 simulated CPU devices."""

import os
import subprocess
import sys
import textwrap

import pytest

from sharding.mesh import MESH_AXES, MeshError, resolve_axis_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_minus_one_takes_the_remaining_devices():
    assert resolve_axis_sizes({"data": -1, "expert": 4}, 32) == dict(data=8, fsdp=1, expert=4, pipeline=1, tensor=1)
    assert resolve_axis_sizes({}, 1) == {axis: 1 for axis in MESH_AXES}


@pytest.mark.parametrize("sizes, devices, field", [
    ({"data": 3}, 8, "mesh:"),
    ({"data": -1, "expert": 3}, 8, "mesh.data=-1"),
    ({"data": -1, "fsdp": -1}, 8, "mesh.fsdp=-1"),
    ({"expert": 0}, 8, "mesh.expert=0"),
    ({"experts": 2}, 8, "mesh.experts"),
])
def test_sizes_that_do_not_fit_name_the_axis(sizes, devices, field):
    with pytest.raises(MeshError, match=field.replace(".", r"\.")):
        resolve_axis_sizes(sizes, devices)


DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from dsv3_jax import get_preset
    from dsv3_jax.train.loss import LossConfig
    from dsv3_jax.train.optimizer import OptimizerConfig
    from dsv3_jax.train.schedule import ScheduleConfig
    from dsv3_jax.train.step import BalanceConfig, create_train_state, make_train_step
    from sharding import build_mesh, put_batch, replicate

    assert jax.device_count() == 8
    # eps well above float noise: Adam's first step is g / (|g| + eps), so sign flips of ~0 gradients between
    # reduction orders do not become ±lr differences.
    config = get_preset("tiny").replace(n_layers=2, vocab_size=128, dtype="float32")
    tx, step = make_train_step(config, LossConfig(), ScheduleConfig(peak_lr=1e-2, warmup=1), OptimizerConfig(eps=1e-3),
                               BalanceConfig(gamma=0.01))
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 16, 32)).astype(np.int32)
    state = create_train_state(config, tx, jax.random.PRNGKey(0))
    args = (jnp.float32(0), jnp.float32(np.inf))

    one, one_metrics = jax.jit(step)(jax.device_put(state, jax.devices()[0]), {"tokens": jnp.asarray(tokens)}, *args)
    mesh = build_mesh({"data": -1})
    batch = put_batch(mesh, {"tokens": tokens}, batch_dim=1)
    assert len(batch["tokens"].sharding.device_set) == 8
    assert batch["tokens"].addressable_shards[0].data.shape == (2, 2, 32)
    many, many_metrics = jax.jit(step)(replicate(mesh, state), batch, *args)
    assert len(many.params["embed"]["embedding"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves((one.params, one.moe_bias)), jax.tree.leaves((many.params, many.moe_bias))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert abs(float(one_metrics["loss"]) - float(many_metrics["loss"])) < 1e-5
    print("ok")
""")


def test_data_parallel_step_equals_single_device_step():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
