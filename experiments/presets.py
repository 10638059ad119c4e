"""Run presets: a model plus data, optimizer, schedule, loss, balancing, checkpointing, logging and mesh
(dsv3_jax.train.run_config); every field can be changed from the command line with `--set section.field=value`."""

from __future__ import annotations

import dataclasses

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.config.presets import PRESETS as MODEL_PRESETS
from dsv3_jax.data import DataConfig
from dsv3_jax.train.loss import LossConfig
from dsv3_jax.train.run_config import CheckpointConfig, LoggingConfig, RunConfig, TrainConfig
from dsv3_jax.train.schedule import ScheduleConfig
from dsv3_jax.train.step import BalanceConfig


def _deepseek_v3_recipe(model: ModelConfig) -> RunConfig:
    """The V3 report's pre-training: 4K context with plain RoPE (YaRN comes with the context-extension stages), batch
    ramp 3072 → 15360 over 469B tokens, lr in tokens."""
    return RunConfig(
        model=model.replace(rope_scaling=None, max_position_embeddings=4096),
        data=DataConfig(seq_len=4096, batch_size=3072),
        schedule=ScheduleConfig(peak_lr=2.2e-4, unit="tokens", warmup=2000 * 3072 * 4096, constant=10e12,
                                decay=4.3e12, decay_to=2.2e-5, tail_lrs=(2.2e-5, 7.3e-6), tail_lengths=(333e9, 167e9)),
        loss=LossConfig(mtp_weight=0.3, mtp_weight_after=0.1, mtp_switch_after=10e12),
        balance=BalanceConfig(gamma=0.001, gamma_zero_after=14.3e12, unit="tokens"),
        train=TrainConfig(steps=1_000_000, grad_accum=5, ramp_from=1, ramp_tokens=469e9),
        checkpoint=CheckpointConfig(every=1000, keep=3),
    )


def _context_extension(previous: RunConfig, model: ModelConfig, seq_len: int, batch: int, init_from: str) -> RunConfig:
    """A V3 context-extension stage: 1000 steps of `batch` sequences of `seq_len` tokens at a constant lr of 7.3e-6,
    `model` carrying YaRN, starting from the previous stage's weights (`init_from`, that stage's default workdir).

    A step is grad_accum micro-batches of batch / grad_accum rows: the pre-training's micro-batch in tokens
    (384 × 32K = 96 × 128K = 3072 × 4K). The report gives no MTP weight or bias speed for the extension: those of the end of
    pre-training carry on (λ = 0.1, γ = 0)."""
    micro = previous.train.grad_accum
    return dataclasses.replace(
        previous,
        model=model,
        data=dataclasses.replace(previous.data, seq_len=seq_len, batch_size=batch // micro),
        schedule=ScheduleConfig(peak_lr=7.3e-6, warmup=0),
        loss=dataclasses.replace(previous.loss, mtp_weight=previous.loss.mtp_weight_after, mtp_switch_after=-1),
        balance=dataclasses.replace(previous.balance, gamma=0.0, gamma_zero_after=-1),
        train=TrainConfig(steps=1000, grad_accum=micro),
        checkpoint=CheckpointConfig(every=100, keep=3, init_from=init_from),
    )


# DeepSeek-V3 in three stages, each started from the previous one's weights (--workdir defaults to runs/<config>):
# 4K pre-training with plain RoPE, then YaRN (s = 40, α = 1, β = 32, softmax scale × (0.1 ln s + 1)², the released
# model's rope_scaling) at 32K (batch 1920) and at 128K (batch 480).
_V3_PRETRAIN = _deepseek_v3_recipe(MODEL_PRESETS["v3-671b"])
_V3_EXT32K = _context_extension(_V3_PRETRAIN, MODEL_PRESETS["v3-671b"], 32768, 1920, "runs/v3-671b")
_V3_EXT128K = _context_extension(_V3_EXT32K, MODEL_PRESETS["v3-671b"], 131072, 480, "runs/v3-671b-ext32k")


RUN_PRESETS: dict[str, RunConfig] = {
    "tiny": RunConfig(
        model=MODEL_PRESETS["tiny"],
        data=DataConfig(seq_len=128, batch_size=8, bpe_vocab_size=2048),
        schedule=ScheduleConfig(peak_lr=3e-3, warmup=50, constant=0, decay=1500, decay_to=3e-4),
        balance=BalanceConfig(gamma=0.001),
        train=TrainConfig(steps=1500),
        checkpoint=CheckpointConfig(every=250, keep=2),
        logging=LoggingConfig(every=25),
    ),
    "small": RunConfig(
        model=MODEL_PRESETS["small"],
        data=DataConfig(seq_len=2048, batch_size=8),
        schedule=ScheduleConfig(peak_lr=4.2e-4, warmup=500, constant=0, decay=20000, decay_to=4.2e-5),
        train=TrainConfig(steps=20000),
        checkpoint=CheckpointConfig(every=1000, keep=3),
    ),
    "v2-lite-16b": _deepseek_v3_recipe(MODEL_PRESETS["v2-lite-16b"]),
    "v2-236b": _deepseek_v3_recipe(MODEL_PRESETS["v2-236b"]),
    "v3-671b": _V3_PRETRAIN,
    "v3-671b-ext32k": _V3_EXT32K,
    "v3-671b-ext128k": _V3_EXT128K,
}


def get_run_preset(name: str) -> RunConfig:
    try:
        return RUN_PRESETS[name]
    except KeyError:
        raise ConfigError(f"--config {name!r} is not a preset; choose one of {', '.join(RUN_PRESETS)}") from None


def describe_fields(config, prefix: str = "") -> list[str]:
    """`section.field = default` lines for --help."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines += describe_fields(value, name + ".")
        else:
            lines.append(f"  {name} = {value!r}")
    return lines
