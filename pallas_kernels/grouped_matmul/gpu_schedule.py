"""Work lists for the Mosaic GPU grouped matmuls, computed from group sizes with a few small jnp ops.

`row_tile_items`: the (segment, row tile) pairs a row-ragged kernel (gmm, gmm_t, gmm_fp8) visits. Segments are
the G groups plus a tail segment G = rows at or past sum(group_sizes), which the kernel fills with zeros. A row
tile straddling a boundary appears once per segment it touches; each item owns rows [lo, hi) of its tile.
`group_row_ranges`: each group's [start, end) rows, for the weight-gradient kernels (tgmm, tgmm_fp8).
"""

from __future__ import annotations

import jax.numpy as jnp


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_row_ranges(group_sizes_G, num_rows: int):
    """(start_G, end_G) int32: rows [start, end) of each group, clipped to [0, num_rows)."""
    sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    end_G = jnp.cumsum(sizes_G)
    return jnp.minimum(end_G - sizes_G, num_rows), jnp.minimum(end_G, num_rows)


def max_row_tile_items(num_rows: int, num_groups: int, block_m: int) -> int:
    """Static bound on the item count: every one of the G+1 segments adds at most one tile to the plain count."""
    return _cdiv(num_rows, block_m) + num_groups


def row_tile_items(group_sizes_G, num_rows: int, block_m: int):
    """Items (segment_I, tile_I, lo_I, hi_I), int32, I = max_row_tile_items(num_rows, G, block_m).

    Item i computes rows [lo, hi) of row tile `tile` (rows tile*block_m ...) with segment `segment`'s weights;
    segment G means "write zeros". Unused trailing items have lo == hi == 0 and do nothing.
    """
    G = group_sizes_G.shape[0]
    start_G, end_G = group_row_ranges(group_sizes_G, num_rows)
    total = end_G[-1]
    seg_start_S = jnp.concatenate([start_G, total[None]])
    seg_end_S = jnp.concatenate([end_G, jnp.full((1,), num_rows, jnp.int32)])
    nonempty_S = seg_end_S > seg_start_S
    first_tile_S = seg_start_S // block_m
    count_S = jnp.where(nonempty_S, (seg_end_S - 1) // block_m - first_tile_S + 1, 0)
    items_end_S = jnp.cumsum(count_S)
    items_start_S = items_end_S - count_S

    num_items = max_row_tile_items(num_rows, G, block_m)
    i_I = jnp.arange(num_items, dtype=jnp.int32)
    seg_I = jnp.minimum(jnp.searchsorted(items_end_S, i_I, side="right"), G).astype(jnp.int32)
    valid_I = i_I < items_end_S[-1]
    tile_I = first_tile_S[seg_I] + i_I - items_start_S[seg_I]
    lo_I = jnp.maximum(seg_start_S[seg_I], tile_I * block_m)
    hi_I = jnp.minimum(seg_end_S[seg_I], tile_I * block_m + block_m)
    zero = jnp.zeros_like(i_I)
    return (seg_I, jnp.where(valid_I, tile_I, zero), jnp.where(valid_I, lo_I, zero),
            jnp.where(valid_I, hi_I, zero))
