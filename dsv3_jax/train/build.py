"""The one way to build a train step: from a run config and a mesh (real or compile-only devices), the kernels
(resolved once), the optimizer, the state with its shardings, the pipeline schedule, the jitted step and its compile.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv3_jax import kernels as kernel_registry
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.kernels import ExpertSplit, KernelSet
from dsv3_jax.train.pipelined import make_pipelined_train_step, pipeline_plan
from dsv3_jax.train.run_config import RunConfig, parse_compiler_options, pipeline_schedule
from dsv3_jax.train.sharded import jit_sharded_step, state_shardings
from dsv3_jax.train.step import TrainState, create_train_state, make_train_step
from sharding.mesh import batch_sharding, expert_node_size
from sharding.pipeline import BRANCH
from sharding.pipeline_schedules import Schedule

# XLA options the project applies per kernel target (BUILD.md), under train.compiler_options. GPUs: XLA's Triton GEMM
# emitter finds no tile for small matmuls (the `tiny` preset's 32-wide projections fail to compile for an H100); the
# cuBLAS GEMMs it falls back to are what large LLM runs on GPUs use anyway.
TARGET_COMPILER_OPTIONS = {
    "hopper": {"xla_gpu_enable_triton_gemm": False},
    "gpu": {"xla_gpu_enable_triton_gemm": False},
}


def compiler_options(kernels: KernelSet, overrides: str = "") -> dict:
    """The XLA options a step compiled for `kernels`' target gets: the target's defaults, then `overrides`
    (train.compiler_options)."""
    platform = kernel_registry.parse_target(kernels.target).platform
    return {**TARGET_COMPILER_OPTIONS.get(platform, {}), **parse_compiler_options(overrides)}


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's per-device buffer sizes of a compiled program, in bytes: argument, output, alias (donated), temp, and
    peak = argument + output − alias + temp (what one device holds at the program's peak); {} where unknown."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled program and what compiling it took."""
    compiled: Any
    lower_s: float
    compile_s: float

    @property
    def memory(self) -> dict[str, int]:
        return compiled_memory(self.compiled)

    @property
    def peak_bytes(self) -> int:
        return self.memory["peak"]


def compile_timed(lower: Callable[[], Any], compiler_options: dict | None = None) -> Compiled:
    """lower() then .compile() with XLA `compiler_options`, timing both."""
    start = time.perf_counter()
    lowered = lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options or None)
    return Compiled(compiled, lowered_at - start, time.perf_counter() - lowered_at)


def placed(abstract, shardings):
    """ShapeDtypeStructs of `abstract` carrying `shardings` (what lowering and restoring take)."""
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A train step built for a mesh. `jitted(state, batches, tokens_seen, loss_limit) -> (state, metrics)` donates
    the state; batches hold (micro-batches, rows, tokens) int32 `tokens` (and optionally `segment_ids`, `positions`)
    split over the mesh's batch axes."""
    run: RunConfig
    mesh: Mesh
    model: ModelConfig
    kernels: KernelSet
    pipeline: Schedule | None            # the pipeline schedule on a `pipeline` axis
    tx: optax.GradientTransformation
    step_fn: Callable                    # the pure step the jitted one runs
    abstract_state: TrainState
    shardings: TrainState
    jitted: Callable
    compiler_options: dict

    def init_state(self) -> TrainState:
        """A fresh state (seed train.seed), placed by the shardings."""
        init = lambda: create_train_state(self.model, self.tx, jax.random.PRNGKey(self.run.train.seed))
        return jax.jit(init, out_shardings=self.shardings)()

    def placed_state(self) -> TrainState:
        """The state as ShapeDtypeStructs with their shardings (what a checkpoint restores into)."""
        return placed(self.abstract_state, self.shardings)

    def arguments(self, micro: int | None = None, batch: int | None = None, seq_len: int | None = None) -> tuple:
        """Abstract arguments of `jitted` (defaults: the run's micro-batches, batch and sequence length)."""
        micro = micro or self.run.train.grad_accum
        tokens = jax.ShapeDtypeStruct((micro, batch or self.run.data.batch_size, seq_len or self.run.data.seq_len),
                                      jnp.int32, sharding=batch_sharding(self.mesh, 1, 3))
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(self.mesh, PartitionSpec()))
        return self.placed_state(), {"tokens": tokens}, scalar, scalar

    @property
    def tick_branches(self) -> np.ndarray | None:
        """Per device and tick, which branch of the pipeline's tick loop it runs (int [devices, ticks], 0: idle;
        dsv3_jax.train.pipelined.pipeline_plan); None without a pipeline. experiments.estimate prices each tick by
        its slowest device with it."""
        if self.pipeline is None:
            return None
        train = self.run.train
        return pipeline_plan(self.model, self.pipeline, train.pipeline_fuse_pairs,
                             train.pipeline_recompute).rows_by_tick[..., BRANCH]

    def compile(self, micro: int | None = None, batch: int | None = None, seq_len: int | None = None) -> Compiled:
        """The step compiled on abstract arguments (compile-only devices too)."""
        return compile_timed(lambda: self.jitted.lower(*self.arguments(micro, batch, seq_len)))


def build_step(run: RunConfig, mesh: Mesh) -> TrainStep:
    """The train step of `run` on `mesh`: kernels resolved from the mesh's devices (KernelSet, visible in
    TrainStep.kernels), the pipelined step on a `pipeline` axis (train.pipeline_schedule over train.grad_accum
    micro-batches), expert parallelism over an `expert` axis, state placed by mesh.strategy.

        step = build_step(run, mesh)             # pretrain, scaling, benches and the AOT tests all start here
        state = step.init_state()                # or ckpt.restore(..., step.placed_state())
        compiled = step.compile()                # abstract arguments only: works for chips this machine lacks
        compiled.peak_bytes                      # per device: argument + output − alias + temp
    """
    model = run.model.validate()
    kernels = kernel_registry.resolve(model, mesh)
    if mesh.shape.get("expert", 1) > 1:
        try:
            node = expert_node_size(mesh, run.mesh.expert_node_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        kernels = dataclasses.replace(kernels, expert_node_size=node)
    parts = (run.loss, run.schedule, run.optimizer, run.balance)
    pipeline = None
    if mesh.shape.get("pipeline", 1) > 1:
        pipeline = pipeline_schedule(run, mesh.shape["pipeline"])
        tx, step_fn = make_pipelined_train_step(model, kernels, *parts, mesh, pipeline,
                                                fuse_pairs=run.train.pipeline_fuse_pairs,
                                                recompute=run.train.pipeline_recompute)
    else:
        if mesh.shape.get("expert", 1) > 1:
            kernels = kernels.split_experts(ExpertSplit(mesh=mesh, node_size=kernels.expert_node_size))
        tx, step_fn = make_train_step(model, kernels, *parts)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.PRNGKey(0)))
    shardings = state_shardings(model, tx, abstract, mesh, run.mesh.strategy)
    options = compiler_options(kernels, run.train.compiler_options)
    jitted = jit_sharded_step(step_fn, shardings, mesh, manual=pipeline is not None, compiler_options=options)
    return TrainStep(run, mesh, model, kernels, pipeline, tx, step_fn, abstract, shardings, jitted, options)
