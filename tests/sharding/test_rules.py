"""Logical-axis rules: mesh specs per strategy, divisibility, ZeRO-1 placement; and the sharded train step
on 8 simulated devices equals the single-device one for several meshes and strategies."""

from types import SimpleNamespace

import pytest
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_rules, mesh_spec
from tests.fast_compile import cheap_compiles, cpu_devices  # noqa: F401  (fixtures; cheap_compiles is autouse)


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


@pytest.fixture(scope="module")
def single_device(cpu_devices):
    """The tiny model's train step (2 layers, float32) and its result on one device: what every mesh must give."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dataclasses

    from dsv3_jax import get_preset
    from dsv3_jax.kernels import REFERENCE
    from dsv3_jax.train.optimizer import OptimizerConfig
    from dsv3_jax.train.run_config import compile_run
    from dsv3_jax.train.schedule import ScheduleConfig
    from dsv3_jax.train.step import BalanceConfig, create_train_state, make_train_step

    config = get_preset("tiny").replace(n_layers=2, vocab_size=128, dtype="float32")
    # eps above float noise: Adam's first step g / (|g| + eps) must not amplify reduction-order differences.
    run = dataclasses.replace(compile_run(config, batch=16, seq_len=32),
                              schedule=ScheduleConfig(peak_lr=1e-2, warmup=1), optimizer=OptimizerConfig(eps=1e-3),
                              balance=BalanceConfig(gamma=0.01))
    tx, step = make_train_step(config, REFERENCE, run.loss, run.schedule, run.optimizer, run.balance)
    tokens = np.random.default_rng(0).integers(0, 128, size=(1, 16, 32)).astype(np.int32)
    init = lambda: create_train_state(config, tx, jax.random.PRNGKey(0))
    args = (jnp.float32(0), jnp.float32(np.inf))
    state, metrics = jax.jit(step)(init(), {"tokens": jnp.asarray(tokens)}, *args)
    return SimpleNamespace(run=run, tokens=tokens, args=args, state=state, metrics=metrics)


@pytest.mark.parametrize("axes, strategy", [({"data": 8}, "zero1"), ({"fsdp": 4, "expert": 2}, "fsdp"),
                                            ({"data": 2, "expert": 4}, "replicated")],
                         ids=["data8-zero1", "fsdp4-expert2-fsdp", "data2-expert4-replicated"])
def test_sharded_step_equals_single_device_step(single_device, cpu_devices, axes, strategy):
    """On 8 devices the sharded step gives the single-device loss, parameters, moe_bias and optimizer state, with the
    experts split over `expert`, ZeRO-1 moments split 8 ways and FSDP parameters over `fsdp`."""
    import jax
    import numpy as np

    import dataclasses

    from dsv3_jax.train.build import build_step
    from sharding import build_mesh, put_batch

    one, where = single_device, f"{axes} {strategy}"
    mesh = build_mesh(axes, cpu_devices)
    built = build_step(dataclasses.replace(one.run, mesh=dataclasses.replace(one.run.mesh, strategy=strategy)), mesh)
    state, run, batch = built.init_state(), built.jitted, put_batch(mesh, {"tokens": one.tokens}, 1)
    # Experts split over `expert` exchange tokens with all_to_all (sharding.expert_parallel).
    lowered = run.lower(state, batch, *one.args)
    assert ("all_to_all" in lowered.as_text()) == (axes.get("expert", 1) > 1), \
        f"all_to_all in the lowered step on {where}: {'all_to_all' in lowered.as_text()}"
    new, metrics = lowered.compile()(state, batch, *one.args)
    np.testing.assert_allclose(float(metrics["loss"]), float(one.metrics["loss"]), rtol=1e-5,
                               err_msg=f"loss on {where}")
    want = jax.tree_util.tree_leaves_with_path((one.state.params, one.state.moe_bias, one.state.opt_state))
    got = jax.tree.leaves((new.params, new.moe_bias, new.opt_state))
    assert len(got) == len(want), f"{len(got)} state leaves on {where}, {len(want)} on one device"
    for (path, a), b in zip(want, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=f"(params, moe_bias, opt_state){jax.tree_util.keystr(path)} on {where}")
    experts = new.params["moe_layers"]["moe"]["experts_gate"]
    assert experts.sharding.spec[1] == "expert" or axes.get("expert", 1) == 1, \
        f"experts_gate {experts.sharding.spec} on {where}: its expert dimension is not split over `expert`"
    moment = new.opt_state.inner_state[1].mu["moe_layers"]["moe"]["experts_gate"]
    if strategy == "zero1":
        assert len(moment.addressable_shards[0].data.flatten()) * 8 == moment.size, \
            f"ZeRO-1 moment of experts_gate {moment.sharding.spec} is not split 8 ways"
    if strategy == "fsdp":
        assert "fsdp" in str(experts.sharding.spec), f"FSDP left experts_gate {experts.sharding.spec} off `fsdp`"
