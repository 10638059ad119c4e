"""MFU's peak table: each chip's dense BF16 peak found from the device_kind JAX reports, compile-only devices of
sharding.targets included, and MFU from it."""

import pytest

from dsv3_jax.train.mfu import mfu, peak_flops_for_kind, peak_flops_per_device


@pytest.mark.parametrize("kind, peak", [
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("TPU v4", 275e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H800", 989e12), ("cpu", None),
])
def test_peak_by_device_kind(kind, peak):
    assert peak_flops_for_kind(kind) == peak


@pytest.mark.parametrize("target, peak", [("v5e:2x2", 197e12), ("v5p:2x2x1", 459e12), ("v6e:2x2", 918e12)])
def test_compile_only_tpus_find_their_peak(target, peak):
    from sharding import targets

    assert peak_flops_per_device(targets.devices(target)[0]) == peak


def test_mfu_is_model_flops_over_the_devices_peak():
    assert mfu(1000.0, 6e9, 4, 1e12) == pytest.approx(1000.0 * 6e9 / 4e12)
    assert mfu(1000.0, 6e9, 4, None) is None
