"""Small helpers for Pallas TPU kernels that must also lower on a CPU host: integer division without jnp's
flooring ops, and picking one lane / sublane of a lane-dense block (how the FP8 kernels read per-step scales
without storing them as (n, 1) blocks, which TPU memory would pad 128-fold)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def div_nonneg(a, b: int):
    """a // b for a >= 0. lax's truncating ops: jnp's flooring // and % add a `sign`, whose Mosaic lowering asks
    for the TPU generation (so lowering on a CPU host would fail)."""
    return jax.lax.div(a, jnp.int32(b))


def rem_nonneg(a, b: int):
    """a % b for a >= 0."""
    return jax.lax.rem(a, jnp.int32(b))


def pick_column(block, idx):
    """(r, 128) -> (r, 1): column `idx` (traced), by a one-hot lane sum (exact; no dynamic lane slicing)."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, block.shape, 1)
    return jnp.sum(jnp.where(lanes == idx, block, 0.0), axis=1, keepdims=True)


def pick_row(block, idx):
    """(8, c) -> (1, c): row `idx` (traced), by a one-hot sublane sum."""
    rows = jax.lax.broadcasted_iota(jnp.int32, block.shape, 0)
    return jnp.sum(jnp.where(rows == idx, block, 0.0), axis=0, keepdims=True)
