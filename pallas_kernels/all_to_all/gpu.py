"""All-to-all among the GPUs of one node as a Mosaic GPU kernel: every device copies block j of its input straight
into slot `me` of peer j's output over NVLink (TMA through shared memory, `plgpu.remote_ref`), then waits until its
peers' blocks have landed. Only devices that can address each other's memory (one node) can run it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.all_to_all.blocks import block_all_to_all, block_shape, check_axes, unchecked

NUM_BLOCKS = 16          # thread blocks (SMs) the copy runs on; the rest of the GPU stays free for compute
TILE_BYTES = 32 * 1024   # one shared-memory tile
MAX_TILE_DIM = 256       # a TMA box holds at most 256 elements a dimension
TMA_ALIGN = 16           # a TMA row is a multiple of 16 bytes
WARPGROUP_BYTES = 128    # a copy moves a multiple of 128 bytes


def tile_shape(rows: int, cols: int, itemsize: int) -> tuple[int, int] | None:
    """(tile_rows, tile_cols) that divide a [rows, cols] block for TMA copies, the widest and then the tallest that
    fit TILE_BYTES, or None where none does: a row of the tile must be a multiple of 16 bytes and the whole tile a
    multiple of 128 (Mosaic GPU copies in whole warpgroups)."""
    for tc in range(min(cols, MAX_TILE_DIM), 0, -1):
        if cols % tc or (tc * itemsize) % TMA_ALIGN:
            continue
        most = max(1, min(MAX_TILE_DIM, TILE_BYTES // (tc * itemsize)))
        for tr in range(min(rows, most), 0, -1):
            if rows % tr == 0 and (tr * tc * itemsize) % WARPGROUP_BYTES == 0:
                return tr, tc
    return None


def supported(block: tuple[int, ...], dtype) -> bool:
    """Whether blocks of this shape (one peer's block) and dtype can be moved by the kernel."""
    if not block:
        return False
    return tile_shape(math.prod(block[:-1]), block[-1], jnp.dtype(dtype).itemsize) is not None


def _kernel(x_ref, y_ref, tile, loaded, entered, landed, *, axis_name: str, group: int, tiles: tuple[int, int]):
    """Each thread block signals its counterpart on every peer on entry and waits for theirs, so no write lands in
    an output buffer before its owner's kernel holds it; then the blocks share the (peer, tile) copies, peer
    distances staggered so the devices write to different peers at once; then each block tells every peer its
    writes have landed and waits for the same from all of them."""
    me = lax.axis_index(axis_name)
    local = lax.rem(me, group)
    base = me - local
    peer = lambda s: {axis_name: base + lax.rem(local + s, group)}
    for s in range(1, group):
        pl.semaphore_signal(entered, device_id=peer(s))
    pl.semaphore_wait(entered, group - 1)

    rows, cols = x_ref.shape[1:]
    tr, tc = tiles
    for s in range(group):
        destination = (y_ref if s == 0 else plgpu.remote_ref(y_ref, peer(s))).at[local]
        source = x_ref.at[lax.rem(local + s, group)]

        @plgpu.nd_loop((rows // tr, cols // tc), collective_axes="blocks")
        def _copy(step):
            r, c = step.index
            at = (pl.ds(r * tr, tr), pl.ds(c * tc, tc))
            plgpu.copy_gmem_to_smem(source.at[at], tile, loaded)
            plgpu.barrier_wait(loaded)
            plgpu.copy_smem_to_gmem(tile, destination.at[at])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the tile may be refilled

    plgpu.wait_smem_to_gmem(0)   # every write of this block has landed
    for s in range(1, group):
        pl.semaphore_signal(landed, device_id=peer(s))
    pl.semaphore_wait(landed, group - 1)


def _exchange_blocks(x_GX, *, axis_name: str, group: int, num_blocks: int):
    """out[j] = block `me` of x_GX on the group's rank j (groups: `group` consecutive ranks of the axis)."""
    shape = x_GX.shape
    rows, cols = math.prod(shape[1:-1]), shape[-1]
    x_GRC = x_GX.reshape(group, rows, cols)
    tiles = tile_shape(rows, cols, x_GX.dtype.itemsize)
    call = plgpu.kernel(
        functools.partial(_kernel, axis_name=axis_name, group=group, tiles=tiles),
        out_type=jax.ShapeDtypeStruct(x_GRC.shape, x_GRC.dtype),
        grid=(num_blocks,), grid_names=("blocks",),
        scratch_types=[plgpu.SMEM(tiles, x_GRC.dtype), plgpu.Barrier(num_arrivals=1),
                       plgpu.SemaphoreType.REGULAR, plgpu.SemaphoreType.REGULAR])
    return unchecked(call, x_GRC, axis_name, group).reshape(shape)


def all_to_all(x, axis_name: str, split_axis: int, concat_axis: int, *, tiled: bool = False,
               group_size: int | None = None, num_blocks: int = NUM_BLOCKS):
    """jax.lax.all_to_all(x, axis_name, split_axis, concat_axis, tiled=tiled) among each `group_size` consecutive
    ranks of the axis (lax's axis_index_groups [[0..g−1], [g..2g−1], …]; None: the whole axis), by NVLink writes.
    The group must lie in one node. Call inside shard_map with the axis manual, on Hopper GPUs; a block whose last
    dimension TMA cannot tile (`supported`) is a ValueError. Its transpose is the all-to-all with split and concat
    swapped."""
    n = lax.axis_size(axis_name)
    group = group_size or n
    if n % group:
        raise ValueError(f"all_to_all: group_size={group} does not divide the {n} ranks of axis {axis_name!r}")
    split_axis, concat_axis = check_axes(x, group, axis_name, split_axis, concat_axis, tiled)
    block = block_shape(x.shape, group, split_axis, tiled)
    if not supported(block, x.dtype):
        raise ValueError(f"all_to_all: blocks of shape {block} {x.dtype} have a last dimension TMA cannot "
                         f"tile (rows of a multiple of {TMA_ALIGN} bytes, tiles of {WARPGROUP_BYTES})")
    exchange = functools.partial(_exchange_blocks, axis_name=axis_name, group=group, num_blocks=num_blocks)
    return block_all_to_all(exchange, x, group, split_axis, concat_axis, tiled)


def node_all_to_all(x, axis_name: str, split_axis: int, concat_axis: int, *, group_size: int):
    """`all_to_all` among each group_size consecutive ranks where TMA can tile the blocks; lax.all_to_all with the
    same axis_index_groups where it cannot (the expert exchange's transport inside nodes)."""
    if supported(block_shape(x.shape, group_size, split_axis % x.ndim, False), x.dtype):
        return all_to_all(x, axis_name, split_axis, concat_axis, group_size=group_size)
    n = lax.axis_size(axis_name)
    groups = [list(range(g, g + group_size)) for g in range(0, n, group_size)]
    return lax.all_to_all(x, axis_name, split_axis, concat_axis, axis_index_groups=groups)
