"""The absorbed-MLA decode cache: per layer and token, only RMSNorm(c_kv) and the RoPE'd shared key, in slots that are
token positions (DecodeCache).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers.mla import LatentCache


class DecodeCache(NamedTuple):
    """Every layer's latent cache. Slots are token positions: row b's token at position p lives in slot p (prompts are
    right-padded), so rows of different lengths advance independently. A query at position p sees slots 0..p, which
    always hold that row's real tokens: every step writes its new tokens before attending, and whatever lies beyond
    (prompt padding, rejected speculative drafts) is overwritten before any later query can see it. MLA's cache path
    (dsv3_jax.model.layers.mla: write_slots, visible_slots) writes and reads the slots."""

    dense: LatentCache | None   # the first_k_dense_replace dense blocks
    moe: LatentCache | None     # the MoE blocks
    mtp: LatentCache | None     # MTP module 0's block (one layer), kept only for speculative decoding


def values_per_token_per_layer(config: ModelConfig) -> int:
    """kv_lora_rank + qk_rope_head_dim (576 at DeepSeek-V3 dims, 40 for the `tiny` preset), instead of
    n_heads × (qk_head_dim + v_head_dim) for expanded keys and values."""
    return config.kv_lora_rank + config.qk_rope_head_dim


def empty_latent_cache(config: ModelConfig, layers: int, batch: int, max_len: int, dtype=None) -> LatentCache | None:
    if layers == 0:
        return None
    dtype = dtype or config.jnp_dtype
    return LatentCache(jnp.zeros((layers, batch, max_len, config.kv_lora_rank), dtype),
                       jnp.zeros((layers, batch, max_len, config.qk_rope_head_dim), dtype))


def init_cache(config: ModelConfig, batch: int, max_len: int, with_mtp: bool = False, dtype=None) -> DecodeCache:
    """Zeros for `max_len` slots per row; `with_mtp` adds MTP module 0's cache (speculative decoding)."""
    return DecodeCache(
        empty_latent_cache(config, config.first_k_dense_replace, batch, max_len, dtype),
        empty_latent_cache(config, config.n_moe_layers, batch, max_len, dtype),
        empty_latent_cache(config, 1, batch, max_len, dtype) if with_mtp else None)
