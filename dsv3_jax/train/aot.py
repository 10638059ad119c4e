"""The train step and the generate path compiled ahead of time for chips this machine may not have
(sharding.targets' compile-only devices), on abstract arguments only: what the AOT tests and the scaling study
compile, and the per-device memory XLA assigns them.

    mesh = build_mesh({"data": 2, "expert": 2}, targets.devices("v5p:2x2x1"))
    point = compile_train_step(config, mesh, strategy="zero1", batch=8, seq_len=128)
    point.compile_s, point.peak_bytes

The config's kernels are those the mesh's chips run (dsv3_jax.kernels.for_devices); a mesh with a `pipeline` axis
compiles the pipelined step (train.pipeline_schedule `schedule`, `micro` micro-batches).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import for_devices
from dsv3_jax.model import init_variables
from dsv3_jax.train.loss import LossConfig
from dsv3_jax.train.optimizer import OptimizerConfig
from dsv3_jax.train.pipelined import make_pipelined_train_step
from dsv3_jax.train.schedule import ScheduleConfig
from dsv3_jax.train.sharded import jit_sharded_step, state_shardings
from dsv3_jax.train.step import BalanceConfig, create_train_state, make_train_step
from sharding.mesh import batch_sharding


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled program and what compiling it took."""
    compiled: Any
    lower_s: float
    compile_s: float

    @property
    def memory(self) -> dict[str, int]:
        """XLA's per-device buffer sizes: argument, output, alias (donated), temp, in bytes."""
        m = self.compiled.memory_analysis()
        return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}

    @property
    def peak_bytes(self) -> int:
        """argument + output − alias + temp: what one device holds at the program's peak."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"]


def _compile(lower) -> Compiled:
    start = time.perf_counter()
    lowered = lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return Compiled(compiled, lowered_at - start, time.perf_counter() - lowered_at)


def _structs(abstract, shardings):
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, shardings)


def step_arguments(abstract_state, shardings, mesh: Mesh, micro: int, batch: int, seq_len: int) -> tuple:
    """ShapeDtypeStructs with their shardings for every argument of the step: state, batches, two scalars."""
    tokens = jax.ShapeDtypeStruct((micro, batch, seq_len), jnp.int32, sharding=batch_sharding(mesh, 1, 3))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    return _structs(abstract_state, shardings), {"tokens": tokens}, scalar, scalar


def compile_train_step(config: ModelConfig, mesh: Mesh, *, strategy: str = "zero1", schedule: str = "1f1b",
                       micro: int = 1, batch: int = 8, seq_len: int = 128) -> Compiled:
    """The sharded train step of `config` on `mesh` for (micro, batch, seq_len) token batches, compiled."""
    config = for_devices(config, mesh)
    parts = (config, LossConfig(), ScheduleConfig(), OptimizerConfig(), BalanceConfig())
    pipelined = mesh.shape.get("pipeline", 1) > 1
    if pipelined:
        tx, step_fn = make_pipelined_train_step(*parts, mesh, schedule, micro)
    else:
        tx, step_fn = make_train_step(*parts)
    abstract = jax.eval_shape(lambda: create_train_state(config, tx, jax.random.PRNGKey(0)))
    shardings = state_shardings(config, tx, abstract, mesh, strategy)
    step = jit_sharded_step(step_fn, shardings, mesh, manual=pipelined)
    return _compile(lambda: step.lower(*step_arguments(abstract, shardings, mesh, micro, batch, seq_len)))


def compile_generate(config: ModelConfig, device, *, batch: int = 4, prompt_len: int = 64,
                     cache_len: int = 128) -> tuple[Compiled, Compiled]:
    """The generate path's prefill (batch × prompt_len prompts into a cache_len cache) and one absorbed decode
    step, compiled for one device."""
    from dsv3_jax.infer.cache import init_cache
    from dsv3_jax.infer.decode import decode_step, prefill, serving_config

    config = serving_config(for_devices(config, [device]))
    here = SingleDeviceSharding(device)
    on_device = lambda tree: _structs(tree, jax.tree.map(lambda _: here, tree))
    variables = on_device(jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0))))
    cache = on_device(jax.eval_shape(lambda: init_cache(config, batch, cache_len)))
    rows = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=here)
    prefilled = _compile(lambda: prefill.lower(config, variables, rows(batch, prompt_len), rows(batch), cache))
    decoded = _compile(lambda: decode_step.lower(config, variables, rows(batch), rows(batch), cache))
    return prefilled, decoded
