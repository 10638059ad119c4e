"""MLA's training attention core, softmax(q·kᵀ·scale + causal and same-document mask)·v, by `model.attention_impl`:
the einsums (xla), blockwise in plain JAX, Pallas TPU splash, or cuDNN flash attention (`attention_core` lists them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_compat
from dsv3_jax.model.layers.attention import causal_mask, softmax_attention
from dsv3_jax.model.layers.flash_attention import flash_attention, pad_sequence
from sharding.per_shard import on_batch_shards

# The `implementation` argument of jax.nn.dot_product_attention for each config value that goes through it
# (a test maps "cudnn" to "xla" to run the same code path on a CPU).
JAX_NN_IMPLEMENTATION = {"cudnn": "cudnn"}
SPLASH_BLOCK = 128   # the splash kernel's tile (its default); T is padded up to a multiple of it


def attention_core(impl: str, q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA, scale: float,
                   segment_ids_BT=None, dtype=None, interpret: bool = False):
    """(B, T, H, Dv) attention output. `scale` multiplies q·k (YaRN's mscale² included by the caller); `dtype`
    is the fused paths' compute dtype (cuDNN takes bfloat16 or float16), default that of v. `interpret` runs the
    splash kernel in its CPU interpreter.

    `impl` (model.attention_impl, resolved from `auto` before tracing):
      auto       what a real chip runs, resolved by dsv3_jax.kernels.attention_for: xla on CPUs, splash on TPUs,
                 blockwise on GPUs (cudnn on bf16/fp16 GPUs from JAX 0.11 on, see below); not taken here
      xla        the einsums and float32 softmax of dsv3_jax.model.layers.attention (the scores are materialised;
                 any backend)
      blockwise  dsv3_jax.model.layers.flash_attention: the same function blockwise in plain JAX with an online
                 softmax and a custom VJP, never holding the (B, H, T, S) scores (any backend)
      splash     JAX's Pallas TPU splash attention (causal mask, segment ids, q/k and v head dims may differ); TPU
                 only, or in its CPU interpreter
      cudnn      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention. That API wants v shaped
                 like k, so v is zero-padded from v_head_dim to qk_head_dim and the output sliced back.
      cudnn_mla  JAX's cuDNN attention called with v unpadded (cuDNN >= 9.10 runs unequal q/k and v head dims on
                 Hopper); a private JAX function, reached through jax_compat.cudnn_attention.

    q and k are [nope ; rope] per head, the one rope key head shared by all heads. Packed documents (segment ids)
    are a boolean (B, 1, T, S) mask beside the causal flag, which JAX hands cuDNN as an additive bias; JAX 0.11 skips
    that bias's gradient for a boolean mask, while 0.10 asks cuDNN for it too (which cuDNN gives for batch 1 only),
    so `auto` takes cuDNN on GPUs only from JAX 0.11 on. A compile for compile-only H100s (sharding.targets) accepts
    the cuDNN calls without building their cuDNN graphs (workspace 0), so it cannot show that they would run."""
    if impl == "auto":
        raise ValueError("attention_core takes a concrete impl: 'auto' is resolved by dsv3_jax.kernels.resolve")
    if impl == "blockwise":
        return flash_attention(q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA, scale, segment_ids_BT)
    if impl == "xla":
        scores_BHTS = (jnp.einsum("bthu,bshu->bhts", q_nope_BTHU, k_nope_BSHU, preferred_element_type=jnp.float32)
                       + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR, preferred_element_type=jnp.float32))
        return softmax_attention(scores_BHTS * scale, causal_mask(q_nope_BTHU.shape[1], segment_ids_BT), v_BSHA)
    dtype = dtype or v_BSHA.dtype
    H = q_nope_BTHU.shape[2]
    q_BTHQ = jnp.concatenate([q_nope_BTHU, q_rope_BTHR], axis=-1).astype(dtype)
    k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], (*k_rope_BSR.shape[:2], H, k_rope_BSR.shape[-1]))
    k_BSHQ = jnp.concatenate([k_nope_BSHU, k_rope_BSHR.astype(k_nope_BSHU.dtype)], axis=-1).astype(dtype)
    v_BSHA = v_BSHA.astype(dtype)
    if impl == "splash":   # the kernel takes the segment ids themselves
        return splash_attention(q_BTHQ, k_BSHQ, v_BSHA, scale, segment_ids_BT, interpret)
    mask_B1TS = segment_mask(segment_ids_BT)
    if impl in JAX_NN_IMPLEMENTATION:
        return padded_dot_product_attention(q_BTHQ, k_BSHQ, v_BSHA, scale, mask_B1TS, JAX_NN_IMPLEMENTATION[impl])
    if impl == "cudnn_mla":
        return cudnn_mla_attention(q_BTHQ, k_BSHQ, v_BSHA, scale, mask_B1TS)
    raise ValueError(f"model.attention_impl must be one of xla, blockwise, splash, cudnn, cudnn_mla, got {impl!r}")


def segment_mask(segment_ids_BT):
    """(B, 1, T, S) boolean, True where query and key lie in the same packed document; None without segments."""
    if segment_ids_BT is None:
        return None
    return segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]


def padded_dot_product_attention(q_BTHQ, k_BSHQ, v_BSHA, scale: float, mask_B1TS, implementation: str):
    """Causal jax.nn.dot_product_attention with v zero-padded to k's head dim (the API wants them equal)."""
    Dv, Dq = v_BSHA.shape[-1], k_BSHQ.shape[-1]
    if Dv > Dq:
        raise ValueError(f"v_head_dim={Dv} exceeds qk_head_dim={Dq}: the padded attention core needs v_head_dim <= "
                         f"qk_head_dim")
    v_BSHQ = jnp.pad(v_BSHA, ((0, 0), (0, 0), (0, 0), (0, Dq - Dv))) if Dv < Dq else v_BSHA
    out_BTHQ = jax.nn.dot_product_attention(q_BTHQ, k_BSHQ, v_BSHQ, mask=mask_B1TS, scale=scale, is_causal=True,
                                            implementation=implementation)
    return out_BTHQ[..., :Dv]


def cudnn_mla_attention(q_BTHQ, k_BSHQ, v_BSHA, scale: float, mask_B1TS):
    """Causal cuDNN attention with v's own head dim, through JAX's private cuDNN wrapper (GPU only)."""
    try:
        return jax_compat.cudnn_attention(q_BTHQ, k_BSHQ, v_BSHA, scale=scale, mask_B1TS=mask_B1TS)
    except jax_compat.PrivateAPIError as e:
        raise jax_compat.PrivateAPIError(f"model.attention_impl='cudnn_mla': {e}; use 'cudnn'") from None


def splash_attention(q_BTHQ, k_BSHQ, v_BSHA, scale: float, segment_ids_BT, interpret: bool = False):
    """Causal Pallas TPU splash attention per batch row (vmapped, per batch shard on a sharded mesh), segment ids as
    the kernel's own; q is scaled
    in float32 before the kernel (it takes no scale). T is padded to a multiple of SPLASH_BLOCK: the padded keys
    lie after every real query, and the padded queries' rows are dropped."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, H, _ = q_BTHQ.shape
    q_BTHQ = (q_BTHQ.astype(jnp.float32) * scale).astype(q_BTHQ.dtype)
    pad = -T % SPLASH_BLOCK
    q_BTHQ, k_BSHQ, v_BSHA = (pad_sequence(x, pad) for x in (q_BTHQ, k_BSHQ, v_BSHA))
    if segment_ids_BT is None:
        segment_ids_BT = jnp.zeros((B, T), jnp.int32)
    segment_ids_BT = pad_sequence(segment_ids_BT, pad, -1)
    n = T + pad
    mask = splash.MultiHeadMask([splash.CausalMask((n, n))] * H)
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    run = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))
    # A Mosaic kernel XLA cannot partition: on a sharded mesh it runs once per batch shard.
    rows = on_batch_shards(jax.vmap(run), n_split=4)
    out_BHTA = rows(heads_first(q_BTHQ), heads_first(k_BSHQ), heads_first(v_BSHA), segment_ids_BT)
    return heads_first(out_BHTA)[:, :T]
