"""A training run's configuration (model, data, optimizer, schedule, loss, balancing, train loop, checkpoints, logging,
mesh) as frozen dataclasses, and the checks that reject a bad one in one line before anything compiles."""

from __future__ import annotations

import dataclasses

import jax

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.config.overrides import apply_overrides
from dsv3_jax.data import DataConfig
from dsv3_jax.train.loss import LossConfig
from dsv3_jax.train.optimizer import OptimizerConfig
from dsv3_jax.train.schedule import ScheduleConfig
from dsv3_jax.train.stages import StageLayout
from dsv3_jax.train.step import BalanceConfig
from sharding.mesh import MESH_AXES, MeshError, resolve_axis_sizes
from sharding.pipeline_schedules import ScheduleError, make_schedule
from sharding.rules import STRATEGIES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    grad_accum: int = 1              # micro-batches (of data.batch_size rows) per update
    ramp_from: int = 0               # batch-size ramp: micro-batches per update at the start (0: no ramp)
    ramp_tokens: float = 0           # ...rising linearly to grad_accum over this many tokens
    on_nonfinite: str = "skip"       # a NaN/Inf loss or gradient, or a spike: "skip" the update or "stop"
    spike_factor: float = 0.0        # a loss above spike_factor × its running mean is a spike (0: off)
    spike_ema: float = 0.98
    pipeline_schedule: str = "1f1b"  # with mesh.pipeline > 1: gpipe | 1f1b | dualpipe (grad_accum micro-batches)
    pipeline_fuse_pairs: bool = True    # DualPipe: an overlapped pair's forward and backward in one tick, one program
                                        # (fewer lockstep ticks, one chunk's exchange under the other's work; both
                                        # halves' memory at once; false: two ticks)
    pipeline_recompute: bool = True     # a stage's backward recomputes its forward (false: keep the residuals)
    compiler_options: str = ""       # XLA options over the target's defaults, "name=value,..." (BUILD.md lists them)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    use_async: bool = True
    init_from: str = ""              # another run's workdir: start from its weights when this workdir has no
                                     # checkpoint (experiments.init_from says what carries over)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True            # tqdm bar


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh axis sizes (-1 takes all remaining devices) and how parameters are placed on them."""
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    pipeline: int = 1
    tensor: int = 1
    strategy: str = "zero1"          # replicated | zero1 (moments split over data) | fsdp (params too)
    expert_node_size: int = 0        # ranks of the expert axis per node (fast links inside, the expert exchange's
                                     # two hops across); 0: from the devices (sharding.mesh.expert_node_size)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    balance: BalanceConfig = BalanceConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    mesh: MeshConfig = MeshConfig()

    def with_overrides(self, *assignments: str) -> "RunConfig":
        return apply_overrides(self, assignments, prefix="")


def compile_run(model: ModelConfig, *, batch: int, seq_len: int, micro: int = 1, strategy: str = "zero1",
                schedule: str = "1f1b") -> RunConfig:
    """The run a compile-only study of `model` needs: `micro` micro-batches of batch × seq_len tokens per step, the
    parameter strategy and (on a pipeline mesh) the schedule; every other section at its defaults."""
    return RunConfig(model=model, data=DataConfig(seq_len=seq_len, batch_size=batch),
                     train=TrainConfig(grad_accum=micro, pipeline_schedule=schedule),
                     mesh=MeshConfig(strategy=strategy))


def mesh_axes(cfg: RunConfig) -> dict[str, int]:
    return {axis: getattr(cfg.mesh, axis) for axis in MESH_AXES}


def micro_batches_at(cfg: RunConfig, tokens_seen: int) -> int:
    """Micro-batches per update under the batch-size ramp."""
    t = cfg.train
    if t.ramp_from == 0 or t.ramp_tokens <= 0:
        return t.grad_accum
    fraction = min(tokens_seen / t.ramp_tokens, 1.0)
    return max(1, min(t.grad_accum, int(t.ramp_from + (t.grad_accum - t.ramp_from) * fraction)))


def validate_run(cfg: RunConfig, device_count: int | None = None) -> None:
    """ConfigError (one line, naming the field) for a run that cannot work on `device_count` devices (default: the
    process's); nothing compiles."""
    cfg.model.validate()
    try:
        cfg.schedule.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = cfg.train
    if t.steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {t.steps}")
    if t.on_nonfinite not in ("skip", "stop"):
        raise ConfigError(f"train.on_nonfinite must be 'skip' or 'stop', got {t.on_nonfinite!r}")
    if t.grad_accum < 1 or not 0 <= t.ramp_from <= t.grad_accum:
        raise ConfigError(f"train.grad_accum must be >= 1 and train.ramp_from in [0, grad_accum], "
                          f"got {t.grad_accum} and {t.ramp_from}")
    parse_compiler_options(t.compiler_options)
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
                          f"{cfg.model.max_position_embeddings}")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every and checkpoint.keep must be >= 1")
    if cfg.mesh.pipeline > 1:
        if t.ramp_from:
            raise ConfigError("train.ramp_from: the batch-size ramp is not available with mesh.pipeline > 1 "
                              "(the schedule is built for train.grad_accum micro-batches)")
        pipeline_schedule(cfg, cfg.mesh.pipeline)
    if cfg.mesh.strategy not in STRATEGIES:
        raise ConfigError(f"mesh.strategy={cfg.mesh.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    try:
        sizes = resolve_axis_sizes(mesh_axes(cfg), jax.device_count() if device_count is None else device_count)
    except MeshError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.n_routed_experts % sizes["expert"]:
        raise ConfigError(f"mesh.expert={sizes['expert']} does not divide model.n_routed_experts="
                          f"{cfg.model.n_routed_experts}")
    node = cfg.mesh.expert_node_size
    if node < 0 or (node and sizes["expert"] % node):
        raise ConfigError(f"mesh.expert_node_size={node}: must divide mesh.expert={sizes['expert']} (0: from the "
                          f"devices)")
    replicas = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if cfg.data.batch_size % replicas:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {replicas} data-parallel "
                          f"ranks of the mesh (data × fsdp × expert)")


def pipeline_schedule(cfg: RunConfig, n_stages: int):
    """The run's pipeline schedule over `n_stages` stages (one object per run: make_schedule is memoised), after
    checking that the model's MoE layers fill them; ConfigError naming the field otherwise."""
    try:
        schedule = make_schedule(cfg.train.pipeline_schedule, n_stages, cfg.train.grad_accum)
        StageLayout.balanced(cfg.model, n_stages)
    except ScheduleError as e:
        raise ConfigError(f"train.pipeline_schedule / train.grad_accum: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return schedule


def parse_compiler_options(text: str) -> dict:
    """'xla_gpu_enable_triton_gemm=false,xla_foo=3' -> {"xla_gpu_enable_triton_gemm": False, "xla_foo": 3};
    ConfigError naming train.compiler_options for a malformed item."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"train.compiler_options: {item!r} is not name=value")
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            options[name.strip()] = lowered == "true"
        else:
            try:
                options[name.strip()] = int(value)
            except ValueError:
                try:
                    options[name.strip()] = float(value)
                except ValueError:
                    options[name.strip()] = value.strip()
    return options
