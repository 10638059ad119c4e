"""MLA's training attention core, softmax(q·kᵀ·scale + causal and same-document mask)·v, by `model.attention_impl`.

  xla        the einsums and float32 softmax of layers.attention (the scores are materialised; any backend)
  cudnn      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention. That API wants v shaped
             like k, so v is zero-padded from v_head_dim to qk_head_dim and the output sliced back.
  cudnn_mla  JAX's cuDNN attention called with v unpadded (cuDNN >= 9.10 runs unequal q/k and v head dims on
             Hopper); a private JAX function (jax._src.cudnn), imported when first used.

q and k are [nope ; rope] per head, the one rope key head shared by all heads. Packed documents (segment ids) are
a boolean (B, 1, T, S) mask beside the causal flag, which JAX hands cuDNN as an additive bias; JAX 0.11 skips that
bias's gradient for a boolean mask, while 0.10 asks cuDNN for it too (jax-ml/jax#30593: batch 1 only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.layers.attention import causal_mask, softmax_attention

# The `implementation` argument of jax.nn.dot_product_attention for each config value that goes through it
# (a test maps "cudnn" to "xla" to run the same code path on a CPU).
JAX_NN_IMPLEMENTATION = {"cudnn": "cudnn"}


def attention_core(impl: str, q_nope_BTHN, q_rope_BTHR, k_nope_BSHN, k_rope_BSR, v_BSHV, scale: float,
                   segment_ids_BT=None, dtype=None):
    """(B, T, H, Dv) attention output. `scale` multiplies q·k (YaRN's mscale² included by the caller); `dtype`
    is the fused paths' compute dtype (cuDNN takes bfloat16 or float16), default that of v."""
    if impl == "xla":
        scores_BHTS = (jnp.einsum("bthn,bshn->bhts", q_nope_BTHN, k_nope_BSHN, preferred_element_type=jnp.float32)
                       + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR, preferred_element_type=jnp.float32))
        return softmax_attention(scores_BHTS * scale, causal_mask(q_nope_BTHN.shape[1], segment_ids_BT), v_BSHV)
    dtype = dtype or v_BSHV.dtype
    H = q_nope_BTHN.shape[2]
    q_BTHK = jnp.concatenate([q_nope_BTHN, q_rope_BTHR], axis=-1).astype(dtype)
    k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], (*k_rope_BSR.shape[:2], H, k_rope_BSR.shape[-1]))
    k_BSHK = jnp.concatenate([k_nope_BSHN, k_rope_BSHR.astype(k_nope_BSHN.dtype)], axis=-1).astype(dtype)
    v_BSHV = v_BSHV.astype(dtype)
    mask_B1TS = segment_mask(segment_ids_BT)
    if impl in JAX_NN_IMPLEMENTATION:
        return padded_dot_product_attention(q_BTHK, k_BSHK, v_BSHV, scale, mask_B1TS, JAX_NN_IMPLEMENTATION[impl])
    if impl == "cudnn_mla":
        return cudnn_mla_attention(q_BTHK, k_BSHK, v_BSHV, scale, mask_B1TS)
    raise ValueError(f"model.attention_impl must be one of xla, cudnn, cudnn_mla, got {impl!r}")


def segment_mask(segment_ids_BT):
    """(B, 1, T, S) boolean, True where query and key lie in the same packed document; None without segments."""
    if segment_ids_BT is None:
        return None
    return segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]


def padded_dot_product_attention(q_BTHK, k_BSHK, v_BSHV, scale: float, mask_B1TS, implementation: str):
    """Causal jax.nn.dot_product_attention with v zero-padded to k's head dim (the API wants them equal)."""
    Dv, K = v_BSHV.shape[-1], k_BSHK.shape[-1]
    if Dv > K:
        raise ValueError(f"v_head_dim={Dv} exceeds qk_head_dim={K}: the padded attention core needs v_head_dim <= "
                         f"qk_head_dim")
    v_BSHK = jnp.pad(v_BSHV, ((0, 0), (0, 0), (0, 0), (0, K - Dv))) if Dv < K else v_BSHV
    out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask_B1TS, scale=scale, is_causal=True,
                                            implementation=implementation)
    return out_BTHK[..., :Dv]


def cudnn_mla_attention(q_BTHK, k_BSHK, v_BSHV, scale: float, mask_B1TS):
    """Causal cuDNN attention with v's own head dim, through JAX's private cuDNN wrapper (GPU only)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    except ImportError as e:
        raise ImportError(f"model.attention_impl='cudnn_mla' needs JAX's private cuDNN attention "
                          f"(jax._src.cudnn.fused_attention_stablehlo), unavailable in JAX "
                          f"{jax.__version__}: {e}; use 'cudnn'") from None
    return cudnn_attention(q_BTHK, k_BSHK, v_BSHV, mask=mask_B1TS, scale=scale, mask_type=MaskType.CAUSAL,
                           qkv_layout="BTNH")
