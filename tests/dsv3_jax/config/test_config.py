"""ModelConfig: presets, parameter counts, validation messages, HF config round trip."""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dsv3_jax.config import ConfigError, ModelConfig, YarnConfig
from dsv3_jax.model.counting import count_params
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.config.presets import PRESETS, get_preset

TINY = PRESETS["tiny"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    c = get_preset(name)
    assert c.validate() is c


def test_unknown_preset():
    with pytest.raises(ConfigError, match="'nope'"):
        get_preset("nope")


# ---- parameter counts ----------------------------------------------------------------------------
def test_small_counts():
    p = count_params(PRESETS["small"])
    assert p.total == pytest.approx(1.25e9, rel=5e-3)
    assert p.activated == pytest.approx(0.215e9, rel=5e-3)


def test_v3_counts():
    p = count_params(PRESETS["v3-671b"])
    assert p.total == pytest.approx(671e9, rel=1e-2)
    assert p.activated == pytest.approx(37e9, rel=1.5e-2)
    # By hand: head + final norm + 3 dense layers + 58 MoE layers with 8 routed + 1 shared expert.
    d, v = 7168, 129280
    attn = (d * 1536 + 1536 + 1536 * 128 * 192) + (d * (512 + 64) + 512 + 512 * 128 * (128 + 128)) + 128 * 128 * d
    block = attn + 2 * d
    dense = block + 3 * d * 18432
    moe_active = block + 256 * d + (8 + 1) * 3 * d * 2048
    assert p.activated == v * d + d + 3 * dense + 58 * moe_active == 36_625_603_584
    moe_all = block + 256 * d + (256 + 1) * 3 * d * 2048
    assert p.total == 2 * v * d + d + 3 * dense + 58 * moe_all
    assert p.embedding == v * d
    # One MTP module: ≈ 11.5B unique, ≈ 14B with its copies of the embedding and head.
    assert p.mtp_unique == 2 * d + 2 * d * d + moe_all + d
    assert p.mtp_unique == pytest.approx(11.5e9, rel=1.5e-2)
    assert p.mtp == pytest.approx(14e9, rel=5e-2)


def test_v2_counts():
    lite, v2 = count_params(PRESETS["v2-lite-16b"]), count_params(PRESETS["v2-236b"])
    assert lite.activated == pytest.approx(2.4e9, rel=2.5e-2)
    assert lite.total == pytest.approx(15.7e9, rel=1e-2)
    assert v2.activated == pytest.approx(21e9, rel=2.5e-2)
    assert v2.total == pytest.approx(236e9, rel=1e-2)
    assert lite.mtp == lite.mtp_unique == 0


def _init_shapes(c: ModelConfig):
    return jax.eval_shape(lambda: nn.meta.unbox(DeepSeekV3(c).init(jax.random.PRNGKey(0),
                                                                   jnp.zeros((1, 4), jnp.int32))))


def _size(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("changes", [
    {},
    {"tie_word_embeddings": True},
    {"q_lora_rank": None, "n_shared_experts": 0},
    {"num_mtp_modules": 2, "first_k_dense_replace": 0},
    {"num_mtp_modules": 0, "first_k_dense_replace": 3},
], ids=["tiny", "tied", "no_qlora_no_shared", "mtp2_all_moe", "no_mtp_all_dense"])
def test_count_matches_initialised_parameters(changes):
    c = TINY.replace(**changes).validate()
    p = count_params(c)
    shapes = _init_shapes(c)
    assert set(shapes) == ({"params", "moe_bias"} if c.n_moe_layers + c.num_mtp_modules else {"params"})
    assert p.total + p.mtp_unique == _size(shapes["params"])
    mtp_size = sum(_size(v) for k, v in shapes["params"].items() if k.startswith("mtp_"))
    assert mtp_size == p.mtp_unique
    assert p.embedding == _size(shapes["params"]["embed"])
    # The correction bias is one float32 vector per MoE layer and MTP module, outside the params.
    assert _size(shapes.get("moe_bias", {})) == (c.n_moe_layers + c.num_mtp_modules) * c.n_routed_experts


def test_tiny_count_exact():
    p = count_params(TINY)
    assert (p.total, p.mtp_unique, p.activated) == (446_592, 80_256, 241_792)


# ---- validate ------------------------------------------------------------------------------------
BAD = [
    ({"n_routed_experts": 10, "n_group": 4}, "n_group"),
    ({"topk_group": 9, "n_group": 8}, "topk_group"),
    ({"topk_group": 0}, "topk_group"),
    ({"num_experts_per_tok": 9, "n_group": 4, "topk_group": 1, "n_routed_experts": 32}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"n_routed_experts": 8, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 2}, "n_group"),  # noaux_tc top-2
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "random"}, "topk_method"),
    ({"remat_policy": "sometimes"}, "remat_policy"),
    ({"dtype": "int8"}, "dtype"),
    ({"param_dtype": "float64"}, "param_dtype"),
    ({"dim": -1}, "dim"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"n_layers": -3}, "n_layers"),
    ({"n_heads": 0}, "n_heads"),
    ({"kv_lora_rank": -512}, "kv_lora_rank"),
    ({"q_lora_rank": -1}, "q_lora_rank"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"intermediate_size": -1}, "intermediate_size"),
    ({"moe_intermediate_size": -1}, "moe_intermediate_size"),
    ({"n_routed_experts": -8}, "n_routed_experts"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"num_mtp_modules": -1}, "num_mtp_modules"),
    ({"first_k_dense_replace": 62}, "first_k_dense_replace"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"dim": 7168.0}, "dim"),
    ({"dim": True}, "dim"),
    ({"rope_scaling": YarnConfig(factor=0.5)}, "rope_scaling.factor"),
    ({"rope_scaling": YarnConfig(beta_fast=1.0, beta_slow=2.0)}, "rope_scaling.beta_fast"),
    ({"rope_scaling": YarnConfig(original_max_position_embeddings=0)}, "rope_scaling.original_max_position_embeddings"),
]


@pytest.mark.parametrize("changes,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_validate_rejects_and_names_field(changes, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**changes).validate()
    message = str(info.value)
    assert re.search(rf"\bmodel\.{re.escape(field)}\b(?!\.)", message), message
    assert "\n" not in message


def test_validate_accepts_edge_cases():
    ModelConfig(topk_method="greedy", n_group=8, topk_group=1, num_experts_per_tok=8).validate()  # no group limit
    ModelConfig(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=8).validate()
    # A dense-only model needs no sane MoE fields.
    ModelConfig(first_k_dense_replace=61, num_mtp_modules=0, n_routed_experts=0).validate()


# ---- Hugging Face config.json --------------------------------------------------------------------
IMPL_FIELDS = ("scan_layers", "remat_policy", "dtype", "param_dtype")


@pytest.mark.parametrize("name", PRESETS)
def test_hf_round_trip(name, tmp_path):
    c = PRESETS[name].replace(scan_layers=False, remat_policy="full")
    keep = {f: getattr(c, f) for f in IMPL_FIELDS}
    assert ModelConfig.from_hf(c.to_hf(), **keep) == c
    # Through an actual config.json, read from its directory.
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf()))
    assert ModelConfig.from_hf(tmp_path, **keep) == c
    # Without the implementation fields, everything but them survives.
    assert ModelConfig.from_hf(c.to_hf()).replace(**keep) == c


def test_hf_dict_fields():
    hf = PRESETS["v3-671b"].to_hf()
    assert hf["model_type"] == "deepseek_v3" and hf["topk_method"] == "noaux_tc"
    assert hf["num_nextn_predict_layers"] == 1 and hf["rope_interleave"] is True
    assert hf["rope_scaling"]["type"] == "yarn" and hf["rope_scaling"]["factor"] == 40.0
    assert PRESETS["v2-236b"].to_hf()["model_type"] == "deepseek_v2"
    assert "rope_scaling" not in TINY.to_hf()


def test_from_hf_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    hf = TINY.to_hf()
    with pytest.raises(ConfigError, match="rope_interleave"):
        ModelConfig.from_hf({**hf, "rope_interleave": False})
    with pytest.raises(ConfigError, match="rope_scaling.type"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match=r"model\.n_group"):
        ModelConfig.from_hf({**hf, "n_group": 3})
