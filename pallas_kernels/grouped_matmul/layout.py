"""Row layouts of grouped operands: each row's group, and the group-aligned layout of the FP8 weight gradient."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax.experimental import pallas as pl


def group_bounds(group_sizes_E, N: int):
    """(starts_E, ends_E) int32 row ranges of the groups, clipped to the N rows (negative sizes count as 0)."""
    ends_E = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes_E.astype(jnp.int32), 0)), N)
    starts_E = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_E[:-1]])
    return starts_E, ends_E


def group_of_rows(group_sizes_E, N: int):
    """int32 [N]: the group of each row, E for rows at or past sum(group_sizes_E)."""
    _, ends_E = group_bounds(group_sizes_E, N)
    return jnp.searchsorted(ends_E, jnp.arange(N, dtype=jnp.int32), side="right").astype(jnp.int32)


class AlignedRows(NamedTuple):
    source_N: jnp.ndarray         # int32 [n_aligned]: the contiguous row each aligned row copies; N = a zero row
    group_sizes_E: jnp.ndarray    # int32 [E]: the padded group sizes, multiples of `align`


def aligned_rows(group_sizes_E, N: int, align: int = 128) -> AlignedRows:
    """The layout where group g starts at a multiple of `align` and is padded with zero rows to one.

    The FP8 weight gradient contracts over rows in 128-row tiles with one scale per tile, so no tile may mix groups;
    `gather_rows` builds this layout from the contiguous one with one gather. Its row count is static:
    round_up(N + E·(align-1), align) bounds every routing of N rows into E groups."""
    E = group_sizes_E.shape[0]
    n_aligned = pl.cdiv(N + E * (align - 1), align) * align
    starts_E, ends_E = group_bounds(group_sizes_E, N)
    padded_E = (ends_E - starts_E + align - 1) // align * align
    padded_ends_E = jnp.cumsum(padded_E)
    rows_N = jnp.arange(n_aligned, dtype=jnp.int32)
    g_N = jnp.minimum(jnp.searchsorted(padded_ends_E, rows_N, side="right"), E - 1)
    offset_N = rows_N - (padded_ends_E[g_N] - padded_E[g_N])
    real_N = (rows_N < padded_ends_E[-1]) & (offset_N < ends_E[g_N] - starts_E[g_N])
    source_N = jnp.where(real_N, starts_E[g_N] + offset_N, N).astype(jnp.int32)
    return AlignedRows(source_N, padded_E.astype(jnp.int32))


def gather_rows(x_NC, layout: AlignedRows):
    """x in the aligned layout: [n_aligned, C], zero rows where `layout.source_N` is N."""
    return jnp.take(x_NC, layout.source_N, axis=0, mode="fill", fill_value=0)
