"""Parameter counts from a ModelConfig alone (total, activated per token, the MTP modules), and the model FLOPs of a
training token.
"""

from __future__ import annotations

import dataclasses

from dsv3_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts. Activated follows DeepSeek's convention (V2-Lite 2.4B, V2 21B, V3 37B): every weight a
    token's forward pass multiplies, i.e. all but the embedding table and the unchosen routed experts."""

    total: int            # main model (embedding, layers, final norm, head); no MTP
    activated: int        # per token, main model
    embedding: int        # the embedding table (not activated)
    mtp: int              # MTP modules, counting their copies of the shared embedding and head
    mtp_unique: int       # MTP modules without the shared embedding and head


def attention_params(c: ModelConfig) -> int:
    h, dq = c.n_heads, c.qk_head_dim
    q = c.dim * h * dq if c.q_lora_rank is None else c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * dq
    kv = c.dim * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + h * c.v_head_dim * c.dim


def mlp_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def moe_params(c: ModelConfig, experts: int) -> int:
    """Gate, `experts` routed experts and the shared experts of one MoE layer."""
    gate = c.n_routed_experts * c.dim
    return gate + experts * mlp_params(c.dim, c.moe_intermediate_size) + \
        mlp_params(c.dim, c.n_shared_experts * c.moe_intermediate_size)


def count_params(c: ModelConfig) -> ParamCount:
    embedding = c.vocab_size * c.dim
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.dim
    block = attention_params(c) + 2 * c.dim
    dense_layer = block + mlp_params(c.dim, c.intermediate_size)
    moe_layer_all = block + moe_params(c, c.n_routed_experts)
    moe_layer_active = block + moe_params(c, c.num_experts_per_tok)
    dense, moe = c.first_k_dense_replace, c.n_moe_layers
    total = embedding + head + c.dim + dense * dense_layer + moe * moe_layer_all
    activated = (c.vocab_size * c.dim) + c.dim + dense * dense_layer + moe * moe_layer_active
    # MTP module: enorm, hnorm, eh_proj, one MoE block, shared_head.norm (+ embed and head copies).
    mtp_unique = c.num_mtp_modules * (2 * c.dim + 2 * c.dim * c.dim + moe_layer_all + c.dim)
    mtp = mtp_unique + c.num_mtp_modules * 2 * c.vocab_size * c.dim
    return ParamCount(total=total, activated=activated, embedding=embedding, mtp=mtp, mtp_unique=mtp_unique)


def train_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 × forward), MTP included.

    Matmuls: 6 × activated weights (embedding lookup excluded, routed experts counted only for the
    K chosen ones, the head once per output: main and each MTP depth). Attention core under a causal
    mask: each query sees (seq_len + 1) / 2 keys on average, costing 2·H·(qk_head_dim + v_head_dim)
    FLOPs per key in the forward.
    """
    counts = count_params(c)
    block_active = attention_params(c) + moe_params(c, c.num_experts_per_tok)
    mtp_active = c.num_mtp_modules * (2 * c.dim * c.dim + block_active + c.vocab_size * c.dim)
    matmul_weights = counts.activated + mtp_active
    keys_per_query = (seq_len + 1) / 2
    attention_fwd = (c.n_layers + c.num_mtp_modules) * 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) * keys_per_query
    return 6.0 * matmul_weights + 3.0 * attention_fwd
