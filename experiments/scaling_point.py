"""One point of the scaling study: the sharded train step AOT-compiled for a mesh (jit(...).lower(...).compile()),
its per-device memory and FLOPs from XLA, and, when asked, a few real steps timed (tokens/s and MFU).

Per-device numbers come from the compiled SPMD program: `memory_analysis` (argument, output, alias, temp) and
`cost_analysis` FLOPs; the exact state bytes of device 0 come from the shardings (experiments.bench.sharding_memory).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.counting import count_params
from dsv3_jax.train.loss import LossConfig
from dsv3_jax.train.mfu import mfu, peak_flops_per_device
from dsv3_jax.train.optimizer import OptimizerConfig
from dsv3_jax.train.pipelined import make_pipelined_train_step
from dsv3_jax.train.schedule import ScheduleConfig
from dsv3_jax.train.sharded import jit_sharded_step, state_shardings
from dsv3_jax.train.step import BalanceConfig, create_train_state, make_train_step
from experiments.bench.sharding_memory import memory, state_bytes
from experiments.cost_model import executed_flops_per_token, model_flops_per_token
from sharding import build_mesh, put_batch


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def measure(point, config: ModelConfig, devices: list, batch: int, seq_len: int, timed_steps: int) -> dict:
    """Compile the step for `point` (an experiments.scaling.Point; on `devices[:point.n_devices]`) and measure it;
    `timed_steps` > 0 also runs it."""
    mesh = build_mesh(point.axes, devices[:point.n_devices])
    parts = (config, LossConfig(), ScheduleConfig(), OptimizerConfig(), BalanceConfig())
    pipelined = point.axes.get("pipeline", 1) > 1
    if pipelined:
        tx, step_fn = make_pipelined_train_step(*parts, mesh, point.schedule, point.micro)
    else:
        tx, step_fn = make_train_step(*parts)
    init = lambda: create_train_state(config, tx, jax.random.PRNGKey(0))
    abstract = jax.eval_shape(init)
    shardings = state_shardings(config, tx, abstract, mesh, point.strategy)
    step = jit_sharded_step(step_fn, shardings, mesh, manual=pipelined)
    tokens = np.zeros((point.micro, batch, seq_len), np.int32)
    batches = put_batch(mesh, {"tokens": tokens}, batch_dim=1)
    scalars = (jnp.float32(0), jnp.float32(np.inf))

    start = time.perf_counter()
    compiled = step.lower(abstract, batches, *scalars).compile()
    compile_s = time.perf_counter() - start
    step_tokens = point.micro * batch * seq_len
    xla_flops = _flops(compiled)
    executed = executed_flops_per_token(config, seq_len) * step_tokens / point.n_devices
    counts = count_params(config)
    row = dict(preset=point.preset, mesh=point.mesh_name, strategy=point.strategy, fp8=point.fp8,
               schedule=point.schedule or "", devices=point.n_devices, micro=point.micro, batch=batch,
               seq_len=seq_len, tokens_per_step=step_tokens, params_total=counts.total + counts.mtp_unique,
               params_activated=counts.activated, compile_s=compile_s,
               **state_bytes(abstract, shardings, mesh.devices.flat[0]), **memory(compiled),
               xla_flops_per_device=xla_flops, cost_model_flops_per_device=executed,
               xla_vs_cost_model=None if xla_flops is None else xla_flops / executed,
               model_flops_per_token=model_flops_per_token(config, seq_len))
    if timed_steps > 0:
        row.update(time_steps(compiled, jax.jit(init, out_shardings=shardings), batches, scalars, timed_steps,
                              step_tokens, row["model_flops_per_token"], point.n_devices, mesh.devices.flat[0]))
    return row


def time_steps(compiled, init, batches, scalars, n_steps: int, step_tokens: int, flops_per_token: float,
               n_devices: int, device) -> dict:
    """One warm-up step, then the mean wall time of `n_steps` more (state donated from step to step)."""
    state = init()
    state, metrics = compiled(state, batches, *scalars)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n_steps):
        state, metrics = compiled(state, batches, *scalars)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / n_steps
    tokens_per_s = step_tokens / step_s
    return dict(step_s=step_s, tokens_per_s=tokens_per_s,
                mfu=mfu(tokens_per_s, flops_per_token, n_devices, peak_flops_per_device(device)))
