"""Reference dispatch/combine with a stable sort by expert id.

dispatch: the T·K (token, choice) pairs sorted by expert, the token rows gathered in that order, and
per-expert counts. combine: rows scattered back to their (token, choice) slot and summed with the
routing weights in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class Dispatched(NamedTuple):
    x_ND: jnp.ndarray            # N = T·K rows, contiguous by expert
    group_sizes_E: jnp.ndarray   # rows per expert (int32)
    order_N: jnp.ndarray         # order_N[n] = flat (token·K + choice) index of sorted row n


def dispatch(x_TD, expert_idx_TK, n_experts: int) -> Dispatched:
    T, K = expert_idx_TK.shape
    flat_N = expert_idx_TK.reshape(-1)
    order_N = jnp.argsort(flat_N, stable=True)
    group_sizes_E = jnp.bincount(flat_N, length=n_experts).astype(jnp.int32)
    return Dispatched(x_TD[order_N // K], group_sizes_E, order_N)


def combine(y_ND, weights_TK, order_N, out_dtype=None):
    T, K = weights_TK.shape
    unsorted_ND = jnp.zeros_like(y_ND).at[order_N].set(y_ND, unique_indices=True)
    weighted = unsorted_ND.reshape(T, K, -1).astype(jnp.float32) * weights_TK.astype(jnp.float32)[..., None]
    return weighted.sum(axis=1).astype(out_dtype or y_ND.dtype)
