"""Multi-head Latent Attention, training form (keys and values expanded from the latent).

q = W_q x, or W_qb RMSNorm(W_qa x) with q-LoRA; [c_kv ; k_rope] = W_kva x; c_kv is normalised and
expanded per head into [k_nope ; v] by W_kvb; k_rope is one rotary head shared by all heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.attention import causal_mask, softmax_attention
from dsv3_jax.layers.linear import make_linear
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.layers.rope import apply_rope


class MLA(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, rope_cos_sin, segment_ids_BT=None):
        c = self.config
        B, T, _ = x_BTD.shape
        H, Dn, Dr, Dv = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name=name)

        if c.q_lora_rank is None:
            q = make_linear(c, H * (Dn + Dr), ("embed", "heads"), "wq")(x_BTD)
        else:
            q_lat = norm("q_norm")(make_linear(c, c.q_lora_rank, ("embed", "q_lora"), "wq_a")(x_BTD))
            q = make_linear(c, H * (Dn + Dr), ("q_lora", "heads"), "wq_b")(q_lat)
        q_BTHK = nn.with_logical_constraint(q.reshape(B, T, H, Dn + Dr), ("batch", "length", "heads", "head_dim"))
        q_nope_BTHN, q_rope_BTHR = q_BTHK[..., :Dn], q_BTHK[..., Dn:]

        kv_a = make_linear(c, c.kv_lora_rank + Dr, ("embed", "kv_lora"), "wkv_a")(x_BTD)
        latent_BTC = norm("kv_norm")(kv_a[..., : c.kv_lora_rank])
        cos, sin = rope_cos_sin
        k_rope_BTR = apply_rope(kv_a[..., None, c.kv_lora_rank:], cos, sin)[:, :, 0]
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin)

        kv_BTHK = make_linear(c, H * (Dn + Dv), ("kv_lora", "heads"), "wkv_b")(latent_BTC).reshape(B, T, H, Dn + Dv)
        k_nope_BSHN, v_BSHV = kv_BTHK[..., :Dn], kv_BTHK[..., Dn:]

        scores_BHTS = (jnp.einsum("bthn,bshn->bhts", q_nope_BTHN, k_nope_BSHN, preferred_element_type=jnp.float32)
                       + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BTR, preferred_element_type=jnp.float32))
        out_BTHV = softmax_attention(scores_BHTS * c.softmax_scale, causal_mask(T, segment_ids_BT), v_BSHV)
        out_BTHV = checkpoint_name(out_BTHV, "attn_out")
        out_BTF = out_BTHV.reshape(B, T, H * Dv)
        return make_linear(c, c.dim, ("heads", "embed"), "wo")(out_BTF)
