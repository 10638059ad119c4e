"""Learning-rate values at chosen steps and token counts: warm-up, constant, cosine, constant tails."""

import math

import pytest

from dsv3_jax.train.schedule import ScheduleConfig, learning_rate

STEPS = ScheduleConfig(peak_lr=1.0, unit="steps", warmup=10, constant=5, decay=10, decay_to=0.1,
                       tail_lrs=(0.05, 0.01), tail_lengths=(5, 100))


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),           # the first update already moves: (0 + 1) / warmup
    (4, 0.5),
    (9, 1.0),
    (12, 1.0),          # constant phase
    (15, 1.0),          # cosine starts at the peak
    (20, 0.55),         # half-way: decay_to + (peak - decay_to) / 2
    (24, 0.1 + 0.45 * (1 + math.cos(math.pi * 0.9))),
    (25, 0.05),         # first tail
    (29, 0.05),
    (30, 0.01),         # the last tail lasts forever
    (10_000, 0.01),
])
def test_step_schedule(step, expected):
    assert float(learning_rate(STEPS, step, tokens=0)) == pytest.approx(expected, rel=1e-6)


def test_token_schedule_ignores_steps():
    c = ScheduleConfig(peak_lr=2.0, unit="tokens", warmup=1000, constant=0, decay=2000, decay_to=0.0)
    assert float(learning_rate(c, 999_999, tokens=500)) == pytest.approx(1.0)
    assert float(learning_rate(c, 0, tokens=2000)) == pytest.approx(1.0)
    assert float(learning_rate(c, 0, tokens=3000)) == pytest.approx(0.0, abs=1e-6)


def test_deepseek_v3_preset_schedule():
    from experiments.presets import get_run_preset
    s = get_run_preset("v3-671b").schedule
    tokens_per_step = 3072 * 4096
    assert float(learning_rate(s, 0, tokens=1000 * tokens_per_step)) == pytest.approx(1.1e-4, rel=1e-5)
    assert float(learning_rate(s, 0, tokens=5e12)) == pytest.approx(2.2e-4)
    assert float(learning_rate(s, 0, tokens=14.4e12)) == pytest.approx(2.2e-5)
    assert float(learning_rate(s, 0, tokens=14.8e12)) == pytest.approx(7.3e-6)


@pytest.mark.parametrize("changes, field", [
    (dict(unit="epochs"), "schedule.unit"),
    (dict(warmup=-1), "schedule.warmup"),
    (dict(tail_lrs=(1e-5,)), "schedule.tail_lrs"),
])
def test_validate_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ScheduleConfig(**changes).validate()
