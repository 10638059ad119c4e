"""`--set` overrides (dsv3_jax.config.overrides): values parsed into each field's type, nested and Optional dataclass
fields, and one-line ConfigErrors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from dsv3_jax.config import ConfigError, YarnConfig
from dsv3_jax.config.overrides import apply_overrides
from dsv3_jax.config.presets import PRESETS

TINY = PRESETS["tiny"]


def test_with_overrides():
    c = TINY.with_overrides("n_layers=4", "q_lora_rank=none", "rope_scaling.factor=8")
    assert c.n_layers == 4 and c.q_lora_rank is None
    assert c.rope_scaling == YarnConfig(factor=8.0)
    assert isinstance(c.rope_scaling.factor, float)
    assert c.replace(n_layers=3, q_lora_rank=32, rope_scaling=None) == TINY
    c.validate()
    c2 = c.with_overrides("q_lora_rank=16", "norm_topk_prob=false", "routed_scaling_factor=2", "dtype=bfloat16",
                          "rope_scaling=none")
    assert (c2.q_lora_rank, c2.norm_topk_prob, c2.routed_scaling_factor, c2.dtype, c2.rope_scaling) == \
        (16, False, 2.0, "bfloat16", None)
    c3 = TINY.with_overrides('rope_scaling={"factor": 4.0, "beta_fast": 16.0}')
    assert c3.rope_scaling == YarnConfig(factor=4.0, beta_fast=16.0)
    assert TINY.with_overrides() == TINY


@pytest.mark.parametrize("assignment,field", [
    ("n_layer=4", "model.n_layer"),
    ("n_layers=four", "model.n_layers"),
    ("n_layers=4.5", "model.n_layers"),
    ("routed_scaling_factor=big", "model.routed_scaling_factor"),
    ("norm_topk_prob=maybe", "model.norm_topk_prob"),
    ("rope_scaling.fctor=8", "model.rope_scaling.fctor"),
    ("rope_scaling.factor=x", "model.rope_scaling.factor"),
    ("rope_scaling={not json", "model.rope_scaling"),
    ("rope_scaling={\"factr\": 2}", "model.rope_scaling"),
    ("dim.size=3", "model.dim.size"),
    ("n_layers", "model.n_layers"),
    ("n_layers=none", "model.n_layers"),
])
def test_bad_overrides_name_the_field(assignment, field):
    with pytest.raises(ConfigError) as info:
        TINY.with_overrides(assignment)
    message = str(info.value)
    assert field in message and "\n" not in message, message


def test_override_to_impossible_value_fails_validation():
    c = TINY.with_overrides("n_layers=-1")
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        c.validate()


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    tags: tuple = (1.0,)


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    maybe: Inner | None = None
    name: str = "a"


def test_nested_sections_of_any_dataclass():
    """Any frozen dataclass tree, without a prefix (the run config's form): sub-fields, a None section created on
    first use, whole sections from JSON or none, tuples from comma lists."""
    out = apply_overrides(Outer(), ["inner.rate=2", "maybe.tags=1,2", "name=b"], prefix="")
    assert out == Outer(inner=Inner(rate=2.0), maybe=Inner(tags=(1.0, 2.0)), name="b")
    assert apply_overrides(out, ["maybe=none", 'inner={"rate": 3}'], prefix="") == Outer(inner=Inner(rate=3), name="b")
    with pytest.raises(ConfigError, match=r"^inner cannot be None$"):
        apply_overrides(Outer(), ["inner=none"], prefix="")
    with pytest.raises(ConfigError, match=r"--set inner\.rte: unknown field 'rte'; known: rate, tags"):
        apply_overrides(Outer(), ["inner.rte=1"], prefix="")


def test_expert_node_size_that_does_not_divide_the_expert_axis_fails_before_compiling():
    from dsv3_jax.train.run_config import RunConfig, validate_run

    run = RunConfig(model=TINY).with_overrides("mesh.expert=4", "mesh.data=1", "mesh.expert_node_size=3")
    with pytest.raises(ConfigError, match=r"mesh\.expert_node_size=3: must divide mesh\.expert=4"):
        validate_run(run, device_count=4)
    validate_run(run.with_overrides("mesh.expert_node_size=2"), device_count=4)
