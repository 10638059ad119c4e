"""dsv3_jax.kernels resolves every kernel once, from the config and the devices a step is placed on: compile-only
H100s and TPUs (sharding.targets) get what the real chips would run, CPUs the references, the explicit modes and
interpreted targets behave as documented, and the model runs exactly the KernelSet it is given."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax import kernels
from dsv3_jax.config import ConfigError
from dsv3_jax.config.presets import PRESETS
from dsv3_jax.model import DeepSeekV3, init_variables
from sharding import targets

BF16 = PRESETS["tiny"].replace(dtype="bfloat16", attention_impl="xla")


def test_auto_on_compile_only_chips_picks_what_the_chip_runs():
    tpu = kernels.resolve(BF16, targets.devices("v5e:2x2"))
    assert (tpu.target, tpu.fp8_matmul, tpu.grouped_matmul, tpu.dispatch, tpu.exchange, tpu.interpret) == (
        "tpu", "tpu", "tpu", "tpu", "tpu", False)
    h100 = kernels.resolve(BF16, targets.devices("h100"))
    assert (h100.target, h100.fp8_matmul, h100.grouped_matmul, h100.dispatch, h100.exchange) == (
        "hopper", "gpu", "gpu", "gpu", "gpu")
    # float32 compute on Hopper: the Mosaic grouped matmul takes bf16/fp16 operands, so auto keeps the MoE references
    f32 = kernels.resolve(BF16.replace(dtype="float32"), targets.devices("h100"))
    assert (f32.fp8_matmul, f32.grouped_matmul, f32.dispatch) == ("gpu", "reference", "reference")
    assert kernels.resolve(BF16, jax.devices("cpu")) == kernels.REFERENCE


def test_exchange_impl_lax_keeps_xlas_all_to_all_on_every_chip():
    for target in ("v5e:2x2", "h100"):
        chosen = kernels.resolve(BF16.replace(exchange_impl="lax"), targets.devices(target))
        assert chosen.exchange == "lax" and chosen.grouped_matmul != "reference", (target, chosen)
    with pytest.raises(ConfigError, match="exchange_impl"):
        BF16.replace(exchange_impl="nccl").validate()


def test_meshes_devices_and_an_explicit_target():
    mesh = jax.sharding.Mesh(targets.devices("v5p:2x2x1"), ("data",))
    assert kernels.resolve(BF16, mesh).target == "tpu"
    assert kernels.resolve(BF16, targets.devices("h100x8")[0]).target == "hopper"
    assert kernels.resolve(BF16.replace(kernel_target="tpu:interpret"), mesh).target == "tpu:interpret"
    assert kernels.platform_of(targets.devices("h100")[0]) == "hopper"
    assert kernels.platform_of(jax.devices("cpu")[0]) == "cpu"


def test_reference_mode_and_interpreted_targets():
    assert kernels.resolve(BF16.replace(kernels="reference"), targets.devices("v5p:2x2x1")) == kernels.KernelSet("tpu")
    interp = kernels.resolve(BF16.replace(kernels="pallas", kernel_target="tpu:interpret"), jax.devices("cpu"))
    assert (interp.grouped_matmul, interp.exchange, interp.interpret) == ("tpu", "lax", True)
    described = interp.describe()
    assert described["target"] == "tpu:interpret" and described["experts"] is None


def test_attention_auto_per_target():
    small = PRESETS["small"]
    assert small.attention_impl == "auto"
    picked = {target: kernels.resolve(small.replace(kernel_target=target), jax.devices("cpu")).attention
              for target in ("cpu", "tpu", "hopper", "gpu", "tpu:interpret")}
    cudnn_ok = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)
    assert picked == {"cpu": "xla", "tpu": "splash", "hopper": "cudnn" if cudnn_ok else "blockwise",
                      "gpu": "blockwise", "tpu:interpret": "xla"}
    for target, dtype, qk, v in [("hopper", "float32", 96, 64), ("gpu", "bfloat16", 192, 128),
                                 ("hopper", "bfloat16", 96, 128), ("hopper", "bfloat16", 300, 128)]:
        # dtype, pre-Hopper head dim, v wider than q/k, head dim > 256
        assert kernels.attention_for("auto", kernels.parse_target(target), dtype, qk, v) == "blockwise"
    assert kernels.attention_for("cudnn_mla", kernels.Target("cpu"), "float32", 96, 64) == "cudnn_mla"


@pytest.mark.parametrize("changes, field", [
    (dict(kernels="fast"), "model.kernels"),
    (dict(kernel_target="a100"), "model.kernel_target"),
    (dict(kernel_target="cpu:interpret"), "model.kernel_target"),
    (dict(kernels="pallas", kernel_target="cpu"), "model.kernels"),
])
def test_bad_settings_are_one_line_config_errors(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b[^\n]*$"):
        BF16.replace(**changes).validate()


def test_pallas_where_an_op_has_no_pallas_kernel_names_the_op_and_target():
    with pytest.raises(ConfigError, match=r"^model.kernels='pallas': hopper has no Pallas grouped matmul[^\n]*float32"):
        kernels.resolve(BF16.replace(kernels="pallas", dtype="float32"), targets.devices("h100"))
    with pytest.raises(ConfigError, match=r"^model.kernels='pallas': target 'cpu' has no Pallas kernels"):
        kernels.resolve(BF16.replace(kernels="pallas"), jax.devices("cpu"))   # the devices' target, not a field


def _ops(model, variables, tokens) -> str:
    return str(jax.make_jaxpr(lambda v: model.apply(v, tokens))(variables))


def test_the_model_runs_the_kernel_set_it_is_given_not_the_config_fields():
    config = BF16.replace(kernels="reference", n_layers=2)   # the fields say references everywhere
    variables = init_variables(config, jax.random.PRNGKey(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    assert "pallas_call" not in _ops(DeepSeekV3(config, kernels.REFERENCE), variables, tokens)
    interpreted = kernels.KernelSet("tpu:interpret", "tpu", "tpu", "tpu", "lax", "xla", True)
    assert "pallas_call" in _ops(DeepSeekV3(config, interpreted), variables, tokens)
