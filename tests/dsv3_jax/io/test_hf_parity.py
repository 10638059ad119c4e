"""Parity with Hugging Face `transformers` (float32, eager attention) through checkpoints.

HF model → HF save_pretrained → our load_pretrained → our logits == HF logits, for V3 with and without
q-LoRA / groups / YaRN (both mscale conventions) and V2 softmax group-limited routing. Then the other way:
our save_pretrained → transformers from_pretrained → same logits, and back through HF's save to the
bit-identical arrays.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from dsv3_jax import YarnConfig, get_preset, init_variables
from dsv3_jax.io.hf import load_pretrained, save_pretrained
from tests.hf_oracle import (build_hf_model, flat, hf_logits, load_quietly, our_logits, perturb_norms_and_bias,
                             quiet_transformers, random_tokens, random_variables)

TOLERANCE = 1e-4
BATCH, SEQ = 2, 24          # longer than the YaRN cases' original_max_position_embeddings (16)
WEIGHT_STD = 0.15

TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=16, v_head_dim=24, n_shared_experts=1, n_routed_experts=8, rms_norm_eps=1e-6)


def yarn(factor: float, mscale: float, mscale_all_dim: float, theta: float, original: int = 16) -> dict:
    return dict(rope_type="yarn", factor=factor, original_max_position_embeddings=original, beta_fast=32.0,
                beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale_all_dim, rope_theta=theta)


@dataclasses.dataclass(frozen=True)
class HFCase:
    name: str
    kind: str          # 'v3' (DeepseekV3ForCausalLM) or 'v2' (DeepseekV2ForCausalLM, softmax routing)
    overrides: dict

    def kwargs(self) -> dict:
        return {**TINY_HF, **self.overrides}


HF_CASES = [
    HFCase("v3_qlora_groups", "v3", dict(
        q_lora_rank=48, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=64,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    HFCase("v3_no_qlora_yarn", "v3", dict(
        q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=2,
        routed_scaling_factor=1.5, norm_topk_prob=True, max_position_embeddings=128,
        rope_parameters=yarn(8.0, 1.0, 1.0, theta=500.0))),
    HFCase("v3_yarn_mscale_differs", "v3", dict(
        q_lora_rank=40, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=640,
        rope_parameters=yarn(40.0, 0.707, 1.0, theta=10000.0))),
    HFCase("v2_softmax_group_limited", "v2", dict(
        q_lora_rank=48, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2,
        topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=4.0,
        max_position_embeddings=64, rope_parameters=yarn(4.0, 0.707, 0.707, theta=10000.0))),
]


def assert_config_matches(config, hf_config, kind: str) -> None:
    """The fields that change the function computed came through config.json unchanged."""
    same = dict(vocab_size="vocab_size", dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                first_k_dense_replace="first_k_dense_replace", q_lora_rank="q_lora_rank", kv_lora_rank="kv_lora_rank",
                qk_nope_head_dim="qk_nope_head_dim", qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim",
                n_routed_experts="n_routed_experts", n_shared_experts="n_shared_experts",
                num_experts_per_tok="num_experts_per_tok", n_group="n_group", topk_group="topk_group",
                routed_scaling_factor="routed_scaling_factor", moe_intermediate_size="moe_intermediate_size",
                intermediate_size="intermediate_size", rms_norm_eps="rms_norm_eps",
                tie_word_embeddings="tie_word_embeddings")
    for ours, theirs in same.items():
        assert getattr(config, ours) == getattr(hf_config, theirs), ours
    rope = hf_config.rope_parameters
    assert config.rope_theta == rope["rope_theta"]
    assert config.scoring_func == ("sigmoid" if kind == "v3" else "softmax")
    assert config.topk_method == ("noaux_tc" if kind == "v3" else hf_config.topk_method)
    assert config.norm_topk_prob == (hf_config.norm_topk_prob if kind == "v3" else False)
    if rope["rope_type"] == "default":
        assert config.rope_scaling is None
    else:
        y = config.rope_scaling
        assert (y.factor, y.original_max_position_embeddings, y.mscale, y.mscale_all_dim, y.beta_fast, y.beta_slow) == (
            rope["factor"], rope["original_max_position_embeddings"], rope["mscale"], rope["mscale_all_dim"],
            rope["beta_fast"], rope["beta_slow"])


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c.name)
def test_hf_checkpoint_gives_hf_logits(case, tmp_path):
    model = build_hf_model(case.kind, seed=1, weight_std=WEIGHT_STD, **case.kwargs())
    model.save_pretrained(tmp_path)
    (config, variables), warned = load_quietly(load_pretrained, tmp_path)
    assert config.dtype == "float32"   # the checkpoint's own dtype, as transformers' dtype="auto" would pick
    # HF's V3 config says num_nextn_predict_layers=1 but its save has no MTP tensors: dropped with a warning.
    assert config.num_mtp_modules == 0
    assert any("MTP" in w for w in warned) == (case.kind == "v3")
    assert_config_matches(config, model.config, case.kind)

    tokens = random_tokens(config.vocab_size, BATCH, SEQ, seed=2)
    expected, got = hf_logits(model, tokens), our_logits(config, variables, tokens)
    diff = float(np.max(np.abs(expected - got)))
    print(f"{case.name}: max |ours - HF| = {diff:.3g} (logit std {expected.std():.3g})")
    assert expected.std() > 0.5, "logits too flat for the comparison to mean anything"
    assert diff <= TOLERANCE


# ---- ours → transformers → ours ---------------------------------------------------------------------

def v3_roundtrip_variables(config, seed):
    variables = jax.jit(functools.partial(init_variables, config))(jax.random.PRNGKey(seed))
    return perturb_norms_and_bias(variables, seed)


OUR_CASES = {
    # The tiny preset (q-LoRA, groups, dense prefix, MTP) with YaRN, initialised by init_variables.
    "v3_tiny_mtp_yarn": (
        get_preset("tiny").replace(vocab_size=256, dtype="float32", initializer_range=0.1, max_position_embeddings=64,
                                   rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=16,
                                                           mscale=0.707, mscale_all_dim=1.0)),
        v3_roundtrip_variables),
    # Softmax routing (DeepseekV2ForCausalLM), no q-LoRA, tied embeddings, no MTP.
    "v2_tied_no_qlora": (
        get_preset("tiny").replace(vocab_size=256, dtype="float32", q_lora_rank=None, scoring_func="softmax",
                                   topk_method="group_limited_greedy", norm_topk_prob=False, n_group=4, topk_group=2,
                                   routed_scaling_factor=2.0, tie_word_embeddings=True, num_mtp_modules=0),
        lambda config, seed: random_variables(config, seed, weight_std=WEIGHT_STD, bias=False)),
}


@pytest.mark.parametrize("name", list(OUR_CASES))
def test_our_checkpoint_roundtrips_through_transformers(name, tmp_path):
    import torch
    transformers = quiet_transformers()
    config, make_variables = OUR_CASES[name]
    variables = make_variables(config, 3)
    save_pretrained(config, variables, tmp_path / "ours")

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    expected_class = "DeepseekV3ForCausalLM" if config.scoring_func == "sigmoid" else "DeepseekV2ForCausalLM"
    assert type(model).__name__ == expected_class
    assert not info["missing_keys"] and not info["mismatched_keys"]
    mtp_prefix = f"model.layers.{config.n_layers}."
    assert all(key.startswith(mtp_prefix) for key in info["unexpected_keys"])     # HF has no MTP: ignored
    assert bool(info["unexpected_keys"]) == (config.num_mtp_modules > 0)

    tokens = random_tokens(config.vocab_size, BATCH, SEQ, seed=4)
    expected, got = hf_logits(model.eval(), tokens), our_logits(config, variables, tokens)
    diff = float(np.max(np.abs(expected - got)))
    print(f"{name}: max |ours - HF| = {diff:.3g} (logit std {expected.std():.3g})")
    assert expected.std() > 0.5
    assert diff <= TOLERANCE

    model.save_pretrained(tmp_path / "hf")
    (config_back, variables_back), _ = load_quietly(load_pretrained, tmp_path / "hf", dtype="float32")
    assert config_back == config.replace(num_mtp_modules=0)
    want = {path: a for path, a in flat(variables).items() if not path[1].startswith("mtp_")}
    got_leaves = flat(variables_back)
    assert set(got_leaves) == set(want)
    for path, array in want.items():
        np.testing.assert_array_equal(got_leaves[path], array, err_msg="/".join(path))
