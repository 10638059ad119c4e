"""Logical-axis rules: mesh specs per strategy, divisibility, ZeRO-1 placement; and the sharded train step
on 8 simulated devices equals the single-device one for several meshes and strategies."""

import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_rules, mesh_spec
from tests.fast_compile import ROOT, subprocess_env



class FakeMesh:
    """Only the axis sizes: all mesh_spec reads."""

    def __init__(self, **sizes):
        self.shape = {axis: 1 for axis in ("data", "fsdp", "expert", "pipeline", "tensor")} | sizes


@pytest.mark.parametrize("strategy, mesh, logical, shape, expected", [
    ("replicated", FakeMesh(data=2, expert=4), ("layers", "expert", "embed", "mlp"), (3, 8, 64, 32),
     P(None, "expert", None, None)),
    ("fsdp", FakeMesh(fsdp=4, expert=2), ("layers", "expert", "embed", "mlp"), (3, 8, 64, 32),
     P(None, "expert", "fsdp", None)),
    # FSDP splits the dense parts over fsdp × expert (an expert mesh's ranks hold different tokens too)
    ("fsdp", FakeMesh(fsdp=4, expert=2), ("embed", "heads"), (64, 8), P(("fsdp", "expert"), None)),
    ("fsdp", FakeMesh(fsdp=4), ("vocab", "embed"), (100, 6), P(None, None)),          # 6 % 4: left whole
    ("replicated", FakeMesh(data=2, fsdp=2, expert=2), ("batch", "length", "embed"), (16, 8, 4),
     P(("data", "fsdp", "expert"), None, None)),
    ("replicated", FakeMesh(data=2, expert=4), ("batch", "length"), (2, 8), P("data", None)),   # 2 rows: data only
    ("replicated", FakeMesh(tensor=4), ("embed", "heads"), (64, 8), P(None, "tensor")),
    ("fsdp", FakeMesh(data=2, fsdp=2), ("batch", "length", "embed"), (8, 4, 16), P(("data", "fsdp"), None, None)),
])
def test_mesh_spec(strategy, mesh, logical, shape, expected):
    assert mesh_spec(logical, shape, mesh, logical_rules(strategy)) == expected


def test_zero1_splits_moments_over_the_data_axes_on_the_largest_dimension():
    mesh = FakeMesh(data=4, expert=2)
    rules = logical_rules("zero1")
    assert mesh_spec(("layers", "expert", "embed", "mlp"), (2, 8, 64, 32), mesh, rules,
                     extra=("data", "fsdp", "expert")) == P(None, "expert", "data", None)
    assert mesh_spec(("vocab", "embed"), (6, 64), mesh, rules, extra=("data", "fsdp", "expert")) == \
        P(None, ("data", "expert"))
    assert mesh_spec(("norm",), (3,), mesh, rules, extra=("data",)) == P(None)      # nothing divides: whole


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="'zero3'"):
        logical_rules("zero3")


SHARDED_STEP_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from dsv3_jax import get_preset
    from dsv3_jax.train.loss import LossConfig
    from dsv3_jax.train.optimizer import OptimizerConfig
    from dsv3_jax.train.schedule import ScheduleConfig
    from dsv3_jax.train.sharded import jit_sharded_step, state_shardings
    from dsv3_jax.train.step import BalanceConfig, create_train_state, make_train_step
    from sharding import build_mesh, put_batch

    config = get_preset("tiny").replace(n_layers=2, vocab_size=128, dtype="float32")
    # eps above float noise: Adam's first step g / (|g| + eps) must not amplify reduction-order differences.
    tx, step = make_train_step(config, LossConfig(), ScheduleConfig(peak_lr=1e-2, warmup=1), OptimizerConfig(eps=1e-3),
                               BalanceConfig(gamma=0.01))
    tokens = np.random.default_rng(0).integers(0, 128, size=(1, 16, 32)).astype(np.int32)
    init = lambda: create_train_state(config, tx, jax.random.PRNGKey(0))
    args = (jnp.float32(0), jnp.float32(np.inf))
    one, one_metrics = jax.jit(step)(init(), {"tokens": jnp.asarray(tokens)}, *args)

    for axes, strategy in [({"data": 8}, "zero1"), ({"fsdp": 4, "expert": 2}, "fsdp"), ({"data": 2, "expert": 4}, "replicated")]:
        mesh = build_mesh(axes)
        shardings = state_shardings(config, tx, jax.eval_shape(init), mesh, strategy)
        state = jax.jit(init, out_shardings=shardings)()
        run, batch = jit_sharded_step(step, shardings, mesh), put_batch(mesh, {"tokens": tokens}, 1)
        # Experts split over `expert` exchange tokens with all_to_all (sharding.expert_parallel).
        lowered = run.lower(state, batch, *args)
        assert ("all_to_all" in lowered.as_text()) == (axes.get("expert", 1) > 1)
        new, metrics = lowered.compile()(state, batch, *args)
        np.testing.assert_allclose(float(metrics["loss"]), float(one_metrics["loss"]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves((one.params, one.moe_bias, one.opt_state)),
                        jax.tree.leaves((new.params, new.moe_bias, new.opt_state))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        experts = new.params["moe_layers"]["moe"]["experts_gate"]
        assert experts.sharding.spec[1] == "expert" or axes.get("expert", 1) == 1, experts.sharding.spec
        moment = new.opt_state.inner_state[1].mu["moe_layers"]["moe"]["experts_gate"]
        if strategy == "zero1":
            assert len(moment.addressable_shards[0].data.flatten()) * 8 == moment.size, moment.sharding.spec
        if strategy == "fsdp":
            assert "fsdp" in str(experts.sharding.spec), experts.sharding.spec
        print(axes, strategy, "ok", flush=True)
    print("all ok")
""")


def test_sharded_step_equals_single_device_step():
    result = subprocess.run([sys.executable, "-c", SHARDED_STEP_SCRIPT], cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("all ok"), \
        result.stdout[-2000:] + result.stderr[-3000:]
