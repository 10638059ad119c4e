"""Named model shapes: `tiny` for tests and CPU runs, `small` for benchmarks, and the published DeepSeek models."""

from __future__ import annotations

from dsv3_jax.config.errors import ConfigError
from dsv3_jax.config.model_config import ModelConfig, YarnConfig

_DEEPSEEK_YARN_V2 = YarnConfig(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                               beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)
_DEEPSEEK_YARN_V3 = YarnConfig(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                               beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)

PRESETS: dict[str, ModelConfig] = {
    # Seconds on a CPU; every feature on (q-LoRA, groups, dense prefix, MoE, shared experts, MTP).
    "tiny": ModelConfig(
        vocab_size=2048, dim=64, n_layers=3, first_k_dense_replace=1, n_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        moe_intermediate_size=32, intermediate_size=128, max_position_embeddings=512,
        num_mtp_modules=1, dtype="float32"),
    # The benchmark preset: 1.25B total, 0.215B activated per token.
    "small": ModelConfig(
        vocab_size=32000, dim=1024, n_layers=12, first_k_dense_replace=1, n_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        moe_intermediate_size=512, intermediate_size=2816, max_position_embeddings=4096,
        num_mtp_modules=1, tie_word_embeddings=False,
        # 8 × 2048 tokens on one 80 GiB H100: the blockwise / flash attention core that `auto` picks there, and the
        # projections' outputs kept while the attention core and experts are recomputed (26 GiB compiled peak)
        remat_policy="dots_no_batch"),
    "v2-lite-16b": ModelConfig(
        vocab_size=102400, dim=2048, n_layers=27, first_k_dense_replace=1, n_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
        routed_scaling_factor=1.0, scoring_func="softmax", norm_topk_prob=False,
        moe_intermediate_size=1408, intermediate_size=10944, rope_scaling=_DEEPSEEK_YARN_V2,
        max_position_embeddings=163840, num_mtp_modules=0),
    "v2-236b": ModelConfig(
        vocab_size=102400, dim=5120, n_layers=60, first_k_dense_replace=1, n_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3, topk_method="group_limited_greedy",
        routed_scaling_factor=16.0, scoring_func="softmax", norm_topk_prob=False,
        moe_intermediate_size=1536, intermediate_size=12288, rope_scaling=_DEEPSEEK_YARN_V2,
        max_position_embeddings=163840, num_mtp_modules=0),
    "v3-671b": ModelConfig(
        vocab_size=129280, dim=7168, n_layers=61, first_k_dense_replace=3, n_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc",
        routed_scaling_factor=2.5, scoring_func="sigmoid", norm_topk_prob=True,
        moe_intermediate_size=2048, intermediate_size=18432, rope_scaling=_DEEPSEEK_YARN_V3,
        max_position_embeddings=163840, num_mtp_modules=1),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"--config {name!r} is not a preset; choose one of {', '.join(PRESETS)}") from None
