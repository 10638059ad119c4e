"""Multi-head Latent Attention, training form (keys and values expanded from the latent).

q = W_q x, or W_qb RMSNorm(W_qa x) with q-LoRA; [c_kv ; k_rope] = W_kva x; c_kv is normalised and
expanded per head into [k_nope ; v] by W_kvb; k_rope is one rotary head shared by all heads.
`project` is those projections, once: MLA runs it with its own modules, the cached decoder (dsv3_jax.infer)
with the same modules over a layer's parameters (`project_params`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax import kernels
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.attention_core import attention_core
from dsv3_jax.layers.linear import make_linear
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.layers.rope import apply_rope


def project(c: ModelConfig, x_BTD, rope_cos_sin, linear, norm):
    """MLA's projections of x: (q_nope_BTHN, q_rope_BTHR, latent_BTC, k_rope_BTR), RoPE applied to both rope
    parts and c_kv normalised. `linear(name, features, axes)` and `norm(name)` give the named sub-layers: MLA's
    own modules in `MLA.__call__`, the same modules over given parameters in `project_params` (decoding)."""
    B, T, _ = x_BTD.shape
    H, Dn, Dr = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
    if c.q_lora_rank is None:
        q = linear("wq", H * (Dn + Dr), ("embed", "heads"))(x_BTD)
    else:
        q_lat = norm("q_norm")(linear("wq_a", c.q_lora_rank, ("embed", "q_lora"))(x_BTD))
        q = linear("wq_b", H * (Dn + Dr), ("q_lora", "heads"))(q_lat)
    q_BTHK = nn.with_logical_constraint(q.reshape(B, T, H, Dn + Dr), ("batch", "length", "heads", "head_dim"))
    kv_a = linear("wkv_a", c.kv_lora_rank + Dr, ("embed", "kv_lora"))(x_BTD)
    latent_BTC = norm("kv_norm")(kv_a[..., : c.kv_lora_rank])
    cos, sin = rope_cos_sin
    k_rope_BTR = apply_rope(kv_a[..., None, c.kv_lora_rank:], cos, sin)[:, :, 0]
    return q_BTHK[..., :Dn], apply_rope(q_BTHK[..., Dn:], cos, sin), latent_BTC, k_rope_BTR


def project_params(c: ModelConfig, p: dict, x_BTD, rope_cos_sin):
    """`project` with MLA's parameters `p` given (its 'params' subtree), outside any module."""
    linear = lambda name, features, axes: functools.partial(make_linear(c, features, axes, name).apply,
                                                            {"params": p[name]})
    norm = lambda name: functools.partial(RMSNorm(c.rms_norm_eps, c.jnp_param_dtype).apply, {"params": p[name]})
    return project(c, x_BTD, rope_cos_sin, linear, norm)


class MLA(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, rope_cos_sin, segment_ids_BT=None):
        c = self.config
        B, T, _ = x_BTD.shape
        H, Dn, Dv = c.n_heads, c.qk_nope_head_dim, c.v_head_dim
        linear = lambda name, features, axes: make_linear(c, features, axes, name)
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name=name)
        q_nope_BTHN, q_rope_BTHR, latent_BTC, k_rope_BTR = project(c, x_BTD, rope_cos_sin, linear, norm)

        kv_BTHK = make_linear(c, H * (Dn + Dv), ("kv_lora", "heads"), "wkv_b")(latent_BTC).reshape(B, T, H, Dn + Dv)
        k_nope_BSHN, v_BSHV = kv_BTHK[..., :Dn], kv_BTHK[..., Dn:]

        chosen = kernels.select(c)   # resolves attention_impl=auto for the kernel target
        out_BTHV = attention_core(chosen.attention, q_nope_BTHN, q_rope_BTHR, k_nope_BSHN, k_rope_BTR, v_BSHV,
                                  c.softmax_scale, segment_ids_BT, c.jnp_dtype, chosen.interpret)
        out_BTHV = checkpoint_name(out_BTHV, "attn_out")
        out_BTF = out_BTHV.reshape(B, T, H * Dv)
        return make_linear(c, c.dim, ("heads", "embed"), "wo")(out_BTF)
