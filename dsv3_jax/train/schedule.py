"""DeepSeek-V3's learning-rate shape: linear warm-up → constant → cosine decay → constant tails.

Lengths are in steps or in tokens (`unit`); the schedule is a pure function of (step, tokens seen).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    peak_lr: float = 2.2e-4
    unit: str = "steps"             # "steps" or "tokens": what the lengths below count
    warmup: float = 2000
    constant: float = 0             # after warm-up, at peak_lr
    decay: float = 0                # cosine from peak_lr to decay_to over this length
    decay_to: float = 2.2e-5
    tail_lrs: tuple[float, ...] = ()       # then constant phases at these rates...
    tail_lengths: tuple[float, ...] = ()   # ...for these lengths (the last one lasts forever)

    def validate(self) -> "ScheduleConfig":
        if self.unit not in ("steps", "tokens"):
            raise ValueError(f"schedule.unit must be 'steps' or 'tokens', got {self.unit!r}")
        for name in ("peak_lr", "warmup", "constant", "decay", "decay_to"):
            if getattr(self, name) < 0:
                raise ValueError(f"schedule.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.tail_lrs) != len(self.tail_lengths):
            raise ValueError(f"schedule.tail_lrs has {len(self.tail_lrs)} entries but schedule.tail_lengths "
                             f"has {len(self.tail_lengths)}")
        return self


def as_float32(count):
    """A step or token count as a float32 scalar (Python ints beyond int32, like token counts, included)."""
    return jnp.float32(count) if isinstance(count, (int, float)) else jnp.asarray(count, jnp.float32)


def learning_rate(config: ScheduleConfig, step, tokens):
    """The rate for the update made at `step` after `tokens` tokens (float32 scalar, jit-friendly)."""
    c = config
    warmup, constant, decay = float(c.warmup), float(c.constant), float(c.decay)   # token counts overflow int32
    t = as_float32(tokens if c.unit == "tokens" else step)
    lr = c.peak_lr * jnp.minimum((t + (1.0 if c.unit == "steps" else 0.0)) / max(warmup, 1e-9), 1.0)
    decay_start = warmup + constant
    if decay > 0:
        progress = jnp.clip((t - decay_start) / decay, 0.0, 1.0)
        cosine = c.decay_to + 0.5 * (c.peak_lr - c.decay_to) * (1 + jnp.cos(jnp.pi * progress))
        lr = jnp.where(t >= decay_start, cosine, lr)
    boundary = decay_start + decay
    for tail_lr, length in zip(c.tail_lrs, c.tail_lengths):
        lr = jnp.where(t >= boundary, tail_lr, lr)
        boundary += float(length)
    return jnp.asarray(lr, jnp.float32)
