"""Multi-head Latent Attention: the training form (keys and values expanded from the latent) and, over a latent
cache, the decode forms (naive: expanded keys and values; absorbed: attention in latent space).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.kernels import KernelSet
from dsv3_jax.model import fp8_weights
from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers.attention import softmax_attention
from dsv3_jax.model.layers.attention_core import attention_core
from dsv3_jax.model.layers.linear import make_linear
from dsv3_jax.model.layers.norm import RMSNorm
from dsv3_jax.model.layers.rope import apply_rope


def project(c: ModelConfig, x_BTD, rope_cos_sin, linear, norm):
    """MLA's projections of x: (q_nope_BTHU, q_rope_BTHR, latent_BTW, k_rope_BTR), RoPE applied to both rope
    parts and c_kv normalised. `linear(name, features, axes)` and `norm(name)` give the named sub-layers.

    q = W_q x, or W_qb RMSNorm(W_qa x) with q-LoRA; [c_kv ; k_rope] = W_kva x; c_kv is normalised (and expanded
    per head into [k_nope ; v] by W_kvb later); k_rope is one rotary head shared by all heads."""
    B, T, _ = x_BTD.shape
    H, Dn, Dr = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
    if c.q_lora_rank is None:
        q = linear("wq", H * (Dn + Dr), ("embed", "heads"))(x_BTD)
    else:
        q_lat = norm("q_norm")(linear("wq_a", c.q_lora_rank, ("embed", "q_lora"))(x_BTD))
        q = linear("wq_b", H * (Dn + Dr), ("q_lora", "heads"))(q_lat)
    q_BTHQ = nn.with_logical_constraint(q.reshape(B, T, H, Dn + Dr), ("batch", "length", "heads", "head_dim"))
    kv_a = linear("wkv_a", c.kv_lora_rank + Dr, ("embed", "kv_lora"))(x_BTD)
    latent_BTW = norm("kv_norm")(kv_a[..., : c.kv_lora_rank])
    cos, sin = rope_cos_sin
    k_rope_BTR = apply_rope(kv_a[..., None, c.kv_lora_rank:], cos, sin)[:, :, 0]
    return q_BTHQ[..., :Dn], apply_rope(q_BTHQ[..., Dn:], cos, sin), latent_BTW, k_rope_BTR


class LayerCache(NamedTuple):
    """One layer's latent cache: RMSNorm(c_kv) and the RoPE'd shared key per slot (a token's position is its slot)."""
    latent_BSW: jnp.ndarray
    rope_BSR: jnp.ndarray


class LatentCache(NamedTuple):
    """A stack's latent caches: LayerCache's arrays with a leading layer axis (the layer scan slices it)."""
    latent_LBSW: jnp.ndarray
    rope_LBSR: jnp.ndarray


def write_slots(cache_BSX, new_BTX, positions_BT):
    """cache[b, positions[b, t]] = new[b, t]; positions past the end are dropped (finished rows run on)."""
    rows_BT = jnp.arange(cache_BSX.shape[0])[:, None]
    return cache_BSX.at[rows_BT, positions_BT].set(new_BTX.astype(cache_BSX.dtype), mode="drop")


def visible_slots(positions_BT, max_len: int):
    """(B, T, S) boolean: slot s is visible to the query at position p when s <= p."""
    return jnp.arange(max_len)[None, None, :] <= positions_BT[:, :, None]


def _split_wkv_b(c: ModelConfig, p: dict):
    """W_kvb [W, H·(Dn+Dv)] as W_UK [W, H, Dn] and W_UV [W, H, Dv] (W: the latent; dequantised when kept as FP8)."""
    w_WX = fp8_weights.dequantize_siblings(p["wkv_b"], c.jnp_dtype)["kernel"].astype(c.jnp_dtype)
    w_WHX = w_WX.reshape(c.kv_lora_rank, c.n_heads, -1)
    return w_WHX[..., : c.qk_nope_head_dim], w_WHX[..., c.qk_nope_head_dim:]


def attend_naive(c: ModelConfig, p: dict, q_nope_BTHU, q_rope_BTHR, latent_BSW, k_rope_BSR, visible_BTS):
    """Training form: expand every cached latent into per-head k_nope and v, then softmax attention."""
    w_uk_WHU, w_uv_WHA = _split_wkv_b(c, p)
    k_nope_BSHU = jnp.einsum("bsw,whu->bshu", latent_BSW.astype(c.jnp_dtype), w_uk_WHU)
    v_BSHA = jnp.einsum("bsw,wha->bsha", latent_BSW.astype(c.jnp_dtype), w_uv_WHA)
    scores_BHTS = (jnp.einsum("bthu,bshu->bhts", q_nope_BTHU, k_nope_BSHU, preferred_element_type=jnp.float32)
                   + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR, preferred_element_type=jnp.float32))
    return softmax_attention(scores_BHTS * c.softmax_scale, visible_BTS[:, None], v_BSHA)


def attend_absorbed(c: ModelConfig, p: dict, q_nope_BTHU, q_rope_BTHR, latent_BSW, k_rope_BSR, visible_BTS):
    """Absorbed form: q_nope·W_UK moves the query into latent space, attention weights sum cached latents,
    and W_UV maps the weighted latent to each head's value; no per-head key or value is ever formed."""
    w_uk_WHU, w_uv_WHA = _split_wkv_b(c, p)
    q_lat_BTHW = jnp.einsum("bthu,whu->bthw", q_nope_BTHU, w_uk_WHU)
    scores_BHTS = (jnp.einsum("bthw,bsw->bhts", q_lat_BTHW, latent_BSW.astype(c.jnp_dtype),
                              preferred_element_type=jnp.float32)
                   + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR.astype(c.jnp_dtype),
                                preferred_element_type=jnp.float32))
    scores_BHTS = jnp.where(visible_BTS[:, None], scores_BHTS * c.softmax_scale, -jnp.inf)
    weights_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)   # slot 0 is always visible: no empty rows
    out_lat_BTHW = jnp.einsum("bhts,bsw->bthw", weights_BHTS.astype(c.jnp_dtype), latent_BSW.astype(c.jnp_dtype))
    return jnp.einsum("bthw,wha->btha", out_lat_BTHW, w_uv_WHA)


def attend_cached(c: ModelConfig, p: dict, q_nope_BTHU, q_rope_BTHR, latent_BTW, k_rope_BTR, cache: LayerCache,
                  positions_BT, absorbed: bool):
    """The new tokens' latents written into the cache at `positions_BT`, then attention over it, absorbed or naive:
    (out_BTHA, the updated LayerCache). `p`: MLA's parameters (W_kvb is read from them, never applied as a layer)."""
    latent_BSW = write_slots(cache.latent_BSW, latent_BTW, positions_BT)
    rope_BSR = write_slots(cache.rope_BSR, k_rope_BTR, positions_BT)
    visible_BTS = visible_slots(positions_BT, latent_BSW.shape[1])
    attend = attend_absorbed if absorbed else attend_naive
    out_BTHA = attend(c, p, q_nope_BTHU, q_rope_BTHR, latent_BSW, rope_BSR, visible_BTS)
    return out_BTHA, LayerCache(latent_BSW, rope_BSR)


class MLA(nn.Module):
    config: ModelConfig
    kernels: KernelSet
    absorbed: bool = True   # with a cache: attention in latent space, or keys and values expanded (naive)

    @nn.compact
    def __call__(self, x_BTD, rope_cos_sin, segment_ids_BT=None, positions_BT=None, cache: LayerCache | None = None):
        """out_BTD; with a `cache` (decoding: the new tokens at positions_BT; segment_ids_BT unused), (out_BTD, the
        updated cache). Given the cache, MLA writes the new tokens' RMSNorm(c_kv) and k_rope into it at their positions
        and attends over it; the model's blocks pass it through, so decoding runs the model's own modules."""
        c, ks = self.config, self.kernels
        B, T, _ = x_BTD.shape
        H, Dn, Dv = c.n_heads, c.qk_nope_head_dim, c.v_head_dim
        linear = lambda name, features, axes: make_linear(c, ks, features, axes, name)
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name=name)
        q_nope_BTHU, q_rope_BTHR, latent_BTW, k_rope_BTR = project(c, x_BTD, rope_cos_sin, linear, norm)

        if cache is not None:
            out_BTHA, cache = attend_cached(c, self.variables["params"], q_nope_BTHU, q_rope_BTHR, latent_BTW,
                                            k_rope_BTR, cache, positions_BT, self.absorbed)
        else:
            wkv_b = make_linear(c, ks, H * (Dn + Dv), ("kv_lora", "heads"), "wkv_b")
            kv_BTHX = wkv_b(latent_BTW).reshape(B, T, H, Dn + Dv)
            k_nope_BSHU, v_BSHA = kv_BTHX[..., :Dn], kv_BTHX[..., Dn:]
            out_BTHA = attention_core(ks.attention, q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BTR, v_BSHA,
                                      c.softmax_scale, segment_ids_BT, c.jnp_dtype, ks.interpret)
            out_BTHA = checkpoint_name(out_BTHA, "attn_out")
        out_BTD = make_linear(c, ks, c.dim, ("heads", "embed"), "wo")(out_BTHA.reshape(B, T, H * Dv))
        return out_BTD if cache is None else (out_BTD, cache)
