"""Where each (token, choice) row goes: the expert-contiguous layout that dispatch fills and combine reads."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class Dispatched(NamedTuple):
    x_ND: jnp.ndarray                      # rows contiguous by expert, in x's dtype (zero rows where padded)
    group_sizes_E: jnp.ndarray             # rows per expert (int32); multiples of `align` when aligned
    order_N: jnp.ndarray                   # flat (token·K + choice) index of row n; T·K on padding rows
    row_TK: jnp.ndarray | None = None      # row of x_ND holding pair (t, k): the inverse of order_N
    group_offsets_E: jnp.ndarray | None = None   # first row of each expert's group (int32)
    x_q_ND: jnp.ndarray | None = None      # x_ND as E4M3 (quantize=True), 1×128 tiles
    scale_NDb: jnp.ndarray | None = None   # float32 [N, ceil(D/128)] scales of x_q_ND (quantize=True)


class Layout(NamedTuple):
    order_N: jnp.ndarray          # int32 [N]: flat pair index of row n, T·K on padding rows
    src_N: jnp.ndarray            # int32 [N]: token of row n, T on padding rows
    row_TK: jnp.ndarray           # int32 [T, K]: row of pair (t, k)
    group_sizes_E: jnp.ndarray    # int32 [E]
    group_offsets_E: jnp.ndarray  # int32 [E]


def padded_rows(n_pairs: int, n_experts: int, align: int) -> int:
    """Static row count of an aligned buffer: enough for any routing of `n_pairs` rows over `n_experts`, the
    worst-case length N + min(E, N)·(align − 1) rounded down to a multiple of `align`."""
    if align == 1:
        return n_pairs
    worst = n_pairs + min(n_experts, n_pairs) * (align - 1)
    return max(align, worst // align * align)


def check_routing(x_TD, expert_idx_TK, n_experts: int, align: int) -> None:
    if x_TD.ndim != 2:
        raise ValueError(f"dispatch: x_TD must be [T, D], got shape {x_TD.shape}")
    if expert_idx_TK.ndim != 2 or expert_idx_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dispatch: expert_idx_TK {expert_idx_TK.shape} must be [T={x_TD.shape[0]}, K]")
    if not jnp.issubdtype(expert_idx_TK.dtype, jnp.integer):
        raise ValueError(f"dispatch: expert_idx_TK must be integer, got {expert_idx_TK.dtype}")
    if n_experts < 1:
        raise ValueError(f"dispatch: n_experts={n_experts} must be positive")
    if align < 1:
        raise ValueError(f"dispatch: align={align} must be >= 1")


def route_layout(expert_idx_TK, n_experts: int, align: int = 1) -> Layout:
    """The row of every pair and the pair of every row, sorted by expert, groups padded to `align` rows.

    The T·K (token, choice) pairs are sorted by expert (stably, so within an expert tokens keep their order). With
    `align` > 1 every expert's group is padded with zero rows to a multiple of `align` rows, so the buffer has a
    static worst-case length (`padded_rows`); rows past the last group are padding too. Padding rows carry
    order_N = T·K and src_N = T (one past the end)."""
    T, K = expert_idx_TK.shape
    n = T * K
    flat_N = expert_idx_TK.reshape(-1).astype(jnp.int32)
    order_N = jnp.argsort(flat_N, stable=True).astype(jnp.int32)
    sizes_E = jnp.bincount(flat_N, length=n_experts).astype(jnp.int32)
    if align == 1:
        row_N = jnp.zeros((n,), jnp.int32).at[order_N].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)
        return Layout(order_N, order_N // K, row_N.reshape(T, K), sizes_E, jnp.cumsum(sizes_E) - sizes_E)
    padded_E = (sizes_E + align - 1) // align * align
    start_E, padded_start_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
    # Sorted row j of expert e moves to padded_start[e] + (j − start[e]).
    sorted_expert_N = flat_N[order_N]
    dest_N = (jnp.arange(n, dtype=jnp.int32) - start_E[sorted_expert_N] + padded_start_E[sorted_expert_N])
    rows = padded_rows(n, n_experts, align)
    padded_order_N = jnp.full((rows,), n, jnp.int32).at[dest_N].set(order_N, unique_indices=True)
    row_N = jnp.zeros((n,), jnp.int32).at[order_N].set(dest_N, unique_indices=True)
    return Layout(padded_order_N, padded_order_N // K, row_N.reshape(T, K), padded_E, padded_start_E)
