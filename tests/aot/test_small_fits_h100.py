"""The `small` preset's train step, as `experiments.pretrain --config small` runs it (8 × 2048 tokens, its own
remat and attention defaults, model.kernels=auto), compiled for one compile-only H100: XLA's peak per device
(argument + output − alias + temp) must stay within 40 GiB of the chip's 80.

The whole 12-layer compile takes about 2 minutes on 2 busy cores, so it runs with `make aot` (marker aot_full).
"""

from __future__ import annotations

import pytest

from dsv3_jax.config.presets import get_preset
from dsv3_jax.train.build import build_step
from dsv3_jax.train.run_config import compile_run
from sharding import targets
from sharding.mesh import build_mesh

BATCH, SEQ_LEN = 8, 2048
BUDGET_BYTES = 40 * 2**30


@pytest.mark.aot_full
def test_small_train_step_fits_40_gib_of_one_h100():
    config = get_preset("small").validate()
    mesh = build_mesh({"data": 1}, targets.devices("h100"))
    point = build_step(compile_run(config, batch=BATCH, seq_len=SEQ_LEN), mesh).compile()
    hlo = point.compiled.as_text()
    assert "mosaic_gpu" in hlo, "the step must run the Mosaic GPU kernels an H100 runs"
    assert point.peak_bytes <= BUDGET_BYTES, {k: f"{v / 2**30:.2f} GiB" for k, v in point.memory.items()}
