"""Work lists for the Mosaic GPU grouped matmuls, computed from group sizes with a few small jnp ops: the (segment, row
tile) items of the row kernels and each group's row range for the weight-gradient kernels.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl


def group_row_ranges(group_sizes_E, num_rows: int):
    """(start_E, end_E) int32: rows [start, end) of each group, clipped to [0, num_rows), for the weight-gradient
    kernels (tgmm, tgmm_fp8)."""
    sizes_E = jnp.maximum(group_sizes_E.astype(jnp.int32), 0)
    end_E = jnp.cumsum(sizes_E)
    return jnp.minimum(end_E - sizes_E, num_rows), jnp.minimum(end_E, num_rows)


def max_row_tile_items(num_rows: int, num_groups: int, block_m: int) -> int:
    """Static bound on the item count: every one of the E+1 segments adds at most one tile to the plain count."""
    return pl.cdiv(num_rows, block_m) + num_groups


def row_tile_items(group_sizes_E, num_rows: int, block_m: int):
    """Items (segment_Y, tile_Y, lo_Y, hi_Y), int32, Y = max_row_tile_items(num_rows, E, block_m).

    Item i computes rows [lo, hi) of row tile `tile` (rows tile*block_m ...) with segment `segment`'s weights;
    segment E means "write zeros". Unused trailing items have lo == hi == 0 and do nothing.

    These are the pairs a row-ragged kernel (gmm, gmm_t, gmm_fp8) visits. Segments are the E groups plus a tail
    segment E = rows at or past sum(group_sizes), which the kernel fills with zeros. A row tile straddling a boundary
    appears once per segment it touches; each item owns rows [lo, hi) of its tile.
    """
    E = group_sizes_E.shape[0]
    start_E, end_E = group_row_ranges(group_sizes_E, num_rows)
    total = end_E[-1]
    # Per segment, E + 1 of them: the groups, then the tail.
    seg_start_E = jnp.concatenate([start_E, total[None]])
    seg_end_E = jnp.concatenate([end_E, jnp.full((1,), num_rows, jnp.int32)])
    nonempty_E = seg_end_E > seg_start_E
    first_tile_E = seg_start_E // block_m
    count_E = jnp.where(nonempty_E, (seg_end_E - 1) // block_m - first_tile_E + 1, 0)
    items_end_E = jnp.cumsum(count_E)
    items_start_E = items_end_E - count_E

    num_items = max_row_tile_items(num_rows, E, block_m)
    i_Y = jnp.arange(num_items, dtype=jnp.int32)
    seg_Y = jnp.minimum(jnp.searchsorted(items_end_E, i_Y, side="right"), E).astype(jnp.int32)
    valid_Y = i_Y < items_end_E[-1]
    tile_Y = first_tile_E[seg_Y] + i_Y - items_start_E[seg_Y]
    lo_Y = jnp.maximum(seg_start_E[seg_Y], tile_Y * block_m)
    hi_Y = jnp.minimum(seg_end_E[seg_Y], tile_Y * block_m + block_m)
    zero = jnp.zeros_like(i_Y)
    return (seg_Y, jnp.where(valid_Y, tile_Y, zero), jnp.where(valid_Y, lo_Y, zero),
            jnp.where(valid_Y, hi_Y, zero))
