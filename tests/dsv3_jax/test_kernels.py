"""dsv3_jax.kernels picks every kernel from the config and the devices a computation is placed on: compile-only
H100s and TPUs (sharding.targets) get what the real chips would run, CPUs the references, and the explicit modes
and interpreted targets behave as documented."""

from __future__ import annotations

import jax
import pytest

from dsv3_jax import kernels
from dsv3_jax.config import ConfigError
from dsv3_jax.config.presets import PRESETS
from sharding import targets

BF16 = PRESETS["tiny"].replace(dtype="bfloat16", attention_impl="xla")


def picked(config, devices):
    return kernels.select(kernels.for_devices(config, devices))


def test_auto_on_compile_only_chips_picks_what_the_chip_runs():
    tpu = picked(BF16, targets.devices("v5e:2x2"))
    assert (tpu.fp8_matmul, tpu.grouped_matmul, tpu.dispatch, tpu.exchange, tpu.interpret) == (
        "tpu", "tpu", "tpu", "pallas", False)
    h100 = picked(BF16, targets.devices("h100"))
    assert (h100.fp8_matmul, h100.grouped_matmul, h100.dispatch, h100.exchange) == ("gpu", "gpu", "gpu", "lax")
    # float32 compute on Hopper: the Mosaic grouped matmul takes bf16/fp16 operands, so the MoE stays on the reference
    f32 = picked(BF16.replace(dtype="float32"), targets.devices("h100"))
    assert (f32.fp8_matmul, f32.grouped_matmul, f32.dispatch) == ("gpu", "reference", "reference")
    assert picked(BF16, jax.devices("cpu")) == kernels.KernelSet()


def test_for_devices_reads_meshes_and_keeps_an_explicit_target():
    mesh = jax.sharding.Mesh(targets.devices("v5p:2x2x1"), ("data",))
    assert kernels.for_devices(BF16, mesh).kernel_target == "tpu"
    assert kernels.for_devices(BF16, targets.devices("h100x8")).kernel_target == "hopper"
    assert kernels.for_devices(BF16.replace(kernel_target="tpu:interpret"), mesh).kernel_target == "tpu:interpret"


def test_reference_mode_and_interpreted_targets():
    assert picked(BF16.replace(kernels="reference"), targets.devices("v5p:2x2x1")) == kernels.KernelSet()
    interp = kernels.select(BF16.replace(kernels="pallas", kernel_target="tpu:interpret"))
    assert (interp.grouped_matmul, interp.exchange, interp.interpret) == ("tpu", "lax", True)
    # an empty target is the default device's: the CPU here
    assert kernels.select(BF16) == kernels.KernelSet()


@pytest.mark.parametrize("changes, field", [
    (dict(kernels="fast"), "model.kernels"),
    (dict(kernel_target="a100"), "model.kernel_target"),
    (dict(kernel_target="cpu:interpret"), "model.kernel_target"),
    (dict(kernels="pallas", kernel_target="cpu"), "model.kernels"),
])
def test_bad_settings_are_one_line_config_errors(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b[^\n]*$"):
        BF16.replace(**changes).validate()
