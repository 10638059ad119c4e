"""The pipeline-parallel train step equals the single-device train step (loss, metrics, params, moe_bias, optimizer
state) on 8 simulated CPU devices with DualPipe and the stages' experts split over an `expert` axis (every schedule's
loss and gradients, also over 4 stages with data parallelism, are held to the single-device ones in
tests/sharding/test_pipeline.py; each step compile here costs a minute on 2 cores), with a MoE stack that does not
split evenly into the stages (padding layers, not run), backwards from the residuals their forwards kept, and the
first and last stages' parameters split over the batch axes; a MoE stack with fewer layers than stages is refused."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels import REFERENCE
from sharding.pipeline_schedules import make_schedule
from tests.fast_compile import cheap_compiles, cpu_devices  # noqa: F401  (fixtures; cheap_compiles is autouse)

M, B, T = 8, 4, 16   # micro-batches, rows per micro-batch, tokens per row


@pytest.fixture(scope="module")
def setup():
    """1 dense + 3 MoE layers (2 stages: the first runs 2; the last, which also runs the MTP module and head, 1 and a
    padding layer), MTP on. eps well above float noise, so Adam's first step g / (|g| + eps) is continuous in g and
    reduction-order differences stay small."""
    from dsv3_jax import get_preset
    from dsv3_jax.train.loss import LossConfig
    from dsv3_jax.train.optimizer import OptimizerConfig
    from dsv3_jax.train.schedule import ScheduleConfig
    from dsv3_jax.train.step import BalanceConfig

    config = get_preset("tiny").replace(n_layers=4, first_k_dense_replace=1, vocab_size=128, dtype="float32")
    configs = (LossConfig(), ScheduleConfig(peak_lr=1e-2, warmup=1), OptimizerConfig(eps=1e-3),
               BalanceConfig(gamma=0.01))
    return SimpleNamespace(config=config, configs=configs)


@pytest.fixture(scope="module")
def single_device(setup, cpu_devices):
    """The batches (packed documents and padding, different in every row, so batch shards hold different numbers of
    targets; micro-batches of different real-token counts, so the step averages over all tokens), the initial state
    and the single-device step's result."""
    from dsv3_jax.train.step import create_train_state, make_train_step

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, setup.config.vocab_size, (M, B, T)).astype(np.int32)
    starts = rng.integers(3, T - 3, (M, B, 1))
    segments = np.where(np.arange(T) < starts, 1, 2).astype(np.int32)
    for m in range(M):
        segments[m, 1, -rng.integers(1, 9):] = 0
    positions = np.where(segments == 2, np.arange(T) - starts, np.arange(T)).astype(np.int32)
    batches = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments),
               "positions": jnp.asarray(positions)}
    args = (jnp.float32(0), jnp.float32(np.inf))

    tx, step = make_train_step(setup.config, REFERENCE, *setup.configs)
    state = jax.jit(create_train_state, static_argnums=(0, 1))(setup.config, tx, jax.random.PRNGKey(0))
    want, want_metrics = jax.jit(step)(state, batches, *args)
    return SimpleNamespace(batches=batches, args=args, state=state, want=want, want_metrics=want_metrics)


# Schedules with 2 stages, expert-parallel inside them (2 of the 8 experts per rank: the lowered step exchanges tokens
# with all_to_all). The other schedules, and 4 stages with data parallelism (dict(pipeline=4, data=2)), are covered
# at the loss-and-gradient level by tests/sharding/test_pipeline.py.
@pytest.mark.parametrize("sizes, name", [(dict(pipeline=2, expert=4), "dualpipe")], ids=["pipeline2-expert4-dualpipe"])
def test_pipelined_step_equals_single_device_step(setup, single_device, cpu_devices, sizes, name):
    from dsv3_jax.train.pipelined import make_pipelined_train_step
    from sharding.mesh import build_mesh

    one, where = single_device, f"{sizes} {name}"
    mesh = build_mesh(sizes, cpu_devices)
    # split_min_size=0: the first and last stages' parameters are split over the batch axes and gathered. Each
    # backward runs from the residuals its forward kept (recomputing backwards: tests/sharding/test_pipeline.py).
    _, pipelined_step = make_pipelined_train_step(setup.config, REFERENCE, *setup.configs, mesh,
                                                  make_schedule(name, sizes["pipeline"], M), split_min_size=0,
                                                  recompute=False)
    lowered = jax.jit(pipelined_step).lower(one.state, one.batches, *one.args)
    assert ("all_to_all" in lowered.as_text()) == (sizes.get("expert", 1) > 1), \
        f"all_to_all in the lowered step on {where}: {'all_to_all' in lowered.as_text()}"
    got, metrics = lowered.compile()(one.state, one.batches, *one.args)

    assert set(metrics) == set(one.want_metrics), \
        f"metrics differ on {where}: {sorted(set(metrics) ^ set(one.want_metrics))}"
    np.testing.assert_allclose(float(metrics["loss"]), float(one.want_metrics["loss"]), rtol=1e-5,
                               err_msg=f"loss on {where}")
    np.testing.assert_array_equal(metrics["expert_counts_LE"], one.want_metrics["expert_counts_LE"],
                                  err_msg=f"expert_counts_LE on {where}")
    assert int(metrics["skipped"]) == 0, f"the step was skipped on {where}"
    for key in one.want_metrics:
        np.testing.assert_allclose(metrics[key], one.want_metrics[key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"metric {key} on {where}")
    got_leaves = jax.tree_util.tree_leaves_with_path((got.params, got.moe_bias, got.opt_state))
    want_leaves = jax.tree.leaves((one.want.params, one.want.moe_bias, one.want.opt_state))
    assert len(got_leaves) == len(want_leaves), \
        f"{len(got_leaves)} state leaves on {where}, {len(want_leaves)} on one device"
    for (path, a), b in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                   err_msg=f"(params, moe_bias, opt_state){jax.tree_util.keystr(path)} on {where}")
    assert int(got.step) == 1, f"step {int(got.step)} after one update on {where}"


def test_fewer_moe_layers_than_stages_is_refused(setup, cpu_devices):
    """1 MoE layer does not fill 2 stages: the error names both fields."""
    from dsv3_jax.train.pipelined import make_pipelined_train_step
    from sharding.mesh import build_mesh

    with pytest.raises(ValueError) as error:
        make_pipelined_train_step(setup.config.replace(n_layers=2), REFERENCE, *setup.configs,
                                  build_mesh(dict(pipeline=2, data=4), cpu_devices), make_schedule("1f1b", 2, M))
    assert "mesh.pipeline=2" in str(error.value) and "model.n_layers=2" in str(error.value), str(error.value)
