"""Row layouts of grouped operands: each row's group, and the group-aligned layout of the FP8 weight gradient.

The FP8 weight gradient contracts over rows in 128-row tiles with one scale per tile, so no tile may mix groups.
`aligned_rows` places group g at a row offset that is a multiple of `align`, each group padded with zero rows to
a multiple of `align`; `gather_rows` builds that layout from the contiguous one with one gather. Its row count is
static: round_up(M + G·(align-1), align) bounds every routing of M rows into G groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_bounds(group_sizes_G, M: int):
    """(starts_G, ends_G) int32 row ranges of the groups, clipped to the M rows (negative sizes count as 0)."""
    ends_G = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes_G.astype(jnp.int32), 0)), M)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    return starts_G, ends_G


def group_of_rows(group_sizes_G, M: int):
    """int32 [M]: the group of each row, G for rows at or past sum(group_sizes_G)."""
    _, ends_G = group_bounds(group_sizes_G, M)
    return jnp.searchsorted(ends_G, jnp.arange(M, dtype=jnp.int32), side="right").astype(jnp.int32)


class AlignedRows(NamedTuple):
    source_P: jnp.ndarray         # int32 [P]: the row of the contiguous layout each aligned row copies; M = a zero row
    group_sizes_G: jnp.ndarray    # int32 [G]: the padded group sizes, multiples of `align`


def aligned_rows(group_sizes_G, M: int, align: int = 128) -> AlignedRows:
    """The layout where group g starts at a multiple of `align` and is padded with zero rows to one."""
    G = group_sizes_G.shape[0]
    P = _cdiv(M + G * (align - 1), align) * align
    starts_G, ends_G = group_bounds(group_sizes_G, M)
    padded_G = (ends_G - starts_G + align - 1) // align * align
    padded_ends_G = jnp.cumsum(padded_G)
    rows_P = jnp.arange(P, dtype=jnp.int32)
    g_P = jnp.minimum(jnp.searchsorted(padded_ends_G, rows_P, side="right"), G - 1)
    offset_P = rows_P - (padded_ends_G[g_P] - padded_G[g_P])
    real_P = (rows_P < padded_ends_G[-1]) & (offset_P < ends_G[g_P] - starts_G[g_P])
    source_P = jnp.where(real_P, starts_G[g_P] + offset_P, M).astype(jnp.int32)
    return AlignedRows(source_P, padded_G.astype(jnp.int32))


def gather_rows(x_MK, layout: AlignedRows):
    """x in the aligned layout: [P, K], zero rows where `layout.source_P` is M."""
    return jnp.take(x_MK, layout.source_P, axis=0, mode="fill", fill_value=0)
