"""DeepSeek-V3's three run presets: 4K pre-training with plain RoPE, then YaRN context extension to 32K and 128K
(s = 40, α = 1, β = 32, softmax scale × (0.1 ln s + 1)²), 1000 steps each at a constant 7.3e-6, each stage
starting from the previous one's weights."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.io.checkpoint import model_signature
from dsv3_jax.model.layers.rope import inverse_frequencies, rope_amplitude, rope_tables
from dsv3_jax.train.schedule import learning_rate
from experiments.init_from import check_same_parameters
from experiments.presets import get_run_preset
from dsv3_jax.train.run_config import validate_run
from tests.dsv3_jax.model.layers.test_rope import np_plain_freqs, np_yarn_freqs

STAGES = ("v3-671b", "v3-671b-ext32k", "v3-671b-ext128k")
QK_HEAD_DIM, ROPE_DIM, THETA = 192, 64, 10000.0


def report_tables(positions, freqs):
    angles = positions[:, None].astype(np.float64) * freqs
    return np.cos(angles), np.sin(angles)


def assert_tables(model, freqs):
    """The model's cos/sin at positions 0..4095 are cos/sin(position · freqs), amplitude 1 (float32 angles: ~1e-3)."""
    positions = np.arange(4096)
    cos, sin = rope_tables(jnp.asarray(positions[None]), model)
    want_cos, want_sin = report_tables(positions, freqs)
    np.testing.assert_allclose(np.asarray(cos[0]), want_cos, atol=3e-3)
    np.testing.assert_allclose(np.asarray(sin[0]), want_sin, atol=3e-3)


def test_pretraining_stage_uses_plain_rope_at_4k():
    cfg = get_run_preset("v3-671b")
    m = cfg.model
    assert m.rope_scaling is None and cfg.data.seq_len == m.max_position_embeddings == 4096
    assert (m.qk_head_dim, m.qk_rope_head_dim, m.rope_theta) == (QK_HEAD_DIM, ROPE_DIM, THETA)
    plain = np_plain_freqs(ROPE_DIM, THETA)
    np.testing.assert_allclose(inverse_frequencies(ROPE_DIM, THETA, m.rope_scaling), plain, rtol=2e-6)
    assert_tables(m, plain)
    assert m.softmax_scale == pytest.approx(1 / math.sqrt(QK_HEAD_DIM), rel=1e-12)


@pytest.mark.parametrize("name,seq_len,batch", [("v3-671b-ext32k", 32768, 1920), ("v3-671b-ext128k", 131072, 480)])
def test_extension_stages_use_yarn_and_the_reports_batch_steps_and_lr(name, seq_len, batch):
    cfg = get_run_preset(name)
    m, y = cfg.model, cfg.model.rope_scaling
    assert (y.factor, y.beta_slow, y.beta_fast, y.original_max_position_embeddings) == (40, 1, 32, 4096)
    yarn, _, _ = np_yarn_freqs(ROPE_DIM, THETA, 40.0, 4096, 32.0, 1.0)
    np.testing.assert_allclose(inverse_frequencies(ROPE_DIM, THETA, y), yarn, rtol=2e-6)
    assert rope_amplitude(y) == 1.0
    assert_tables(m, yarn)
    assert np.abs(yarn - np_plain_freqs(ROPE_DIM, THETA)).max() > 1e-3     # not plain RoPE's tables
    # The report's attention scale: sqrt(t) = 0.1 ln s + 1 on both q and k, i.e. (0.1 ln 40 + 1)² / sqrt(d_qk).
    assert m.softmax_scale == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(QK_HEAD_DIM), rel=1e-12)
    assert m.softmax_scale == pytest.approx(0.135234, abs=5e-7)

    assert cfg.data.seq_len == seq_len <= m.max_position_embeddings
    assert cfg.data.batch_size * cfg.train.grad_accum == batch and cfg.train.ramp_from == 0
    assert cfg.train.steps == 1000
    for step in (0, 1, 500, 999):
        assert float(learning_rate(cfg.schedule, step, step * batch * seq_len)) == pytest.approx(7.3e-6, rel=1e-6)
    validate_run(cfg)


@pytest.mark.parametrize("previous,stage", list(zip(STAGES, STAGES[1:])))
def test_each_extension_stage_starts_from_the_previous_stages_workdir(previous, stage):
    cfg = get_run_preset(stage)
    assert cfg.checkpoint.init_from == f"runs/{previous}"     # experiments.pretrain's default --workdir
    check_same_parameters(model_signature(get_run_preset(previous).model), cfg.model, previous)
