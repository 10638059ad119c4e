"""Masked softmax attention core shared by MLA's training form (float32 softmax)."""

from __future__ import annotations

import jax.numpy as jnp


def causal_mask(T: int, segment_ids_BT=None):
    """(B or 1, 1, T, T) boolean: key index <= query index, and the same packed document when segment ids are given."""
    order = jnp.arange(T)
    mask = (order[:, None] >= order[None, :])[None, None]
    if segment_ids_BT is not None:
        mask = mask & (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
    return mask


def softmax_attention(scores_BHTS, mask_BHTS, v_BSHA):
    """softmax(scores masked) · v in float32; rows with nothing visible give zeros."""
    scores = jnp.where(mask_BHTS, scores_BHTS.astype(jnp.float32), -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(scores - peak)
    weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    return jnp.einsum("bhts,bsha->btha", weights.astype(v_BSHA.dtype), v_BSHA)
