"""Mosaic GPU building blocks shared by the grouped-matmul kernels in gpu.py: the interpret-mode switch
(pallas_kernels.gpu_interpret), swizzled SMEM layouts, WGMMA on optionally transposed SMEM operands, and the
epilogue that stores a register tile (optionally only rows [lo, hi) of it) through SMEM with TMA.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu_interpret import resolve_interpret

SMEM_BYTES = 232_448     # shared memory one H100 block may use (227 KiB)


def interpret_params(interpret):
    """False/None -> None (compile for the GPU); True -> the interpreter's parameters; params pass through."""
    if interpret is None or interpret is False:
        return None
    return resolve_interpret(interpret)


def swizzled(minor: int, dtype) -> tuple:
    """Tiling + swizzle transforms for an SMEM tile whose minor dimension has `minor` elements of `dtype`."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits, "grouped matmul tile")
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def wgmma(acc_ref, a_ref, b_ref, *, a_transposed: bool, b_transposed: bool):
    """acc += op(a) @ op(b) on the tensor cores; op transposes a (k, m) / (n, k) SMEM tile when asked."""
    a = plgpu.transpose_ref(a_ref, (1, 0)) if a_transposed else a_ref
    b = plgpu.transpose_ref(b_ref, (1, 0)) if b_transposed else b_ref
    plgpu.wgmma(acc_ref, a, b)


def accumulator_context(shape, epilogue):
    """A warp-specialized pipeline's compute_context for a plain BF16 WGMMA loop: the pipeline runs over a fresh
    float32 WGMMA accumulator of `shape`, then `epilogue` gets its value."""
    def context(run):
        def acc_scope(acc_ref):
            run(acc_ref)
            return acc_ref[...]
        epilogue(pl.run_scoped(acc_scope, plgpu.ACC(shape, jnp.float32)))
    return context


def wgmma_layout(x, interpret: bool):
    """x cast to the WGMMA register layout (JAX 0.10's interpreter has no layouts, nor a layout_cast rule)."""
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _store_row_range(src_ref, dst_ref, first_row, lo, hi):
    """TMA-store rows [lo, hi) ∩ [first_row, first_row + R) of the R-row SMEM tile `src_ref` to `dst_ref`.

    TMA boxes have static shapes, so the dynamic row count is written as its binary expansion: one
    conditional store of 2^j rows for every set bit j (at most log2(R) + 1 stores, one for a full tile).
    """
    rows = src_ref.shape[0]
    start = jnp.clip(lo - first_row, 0, rows)
    size = jnp.maximum(jnp.clip(hi - first_row, 0, rows) - start, 0)
    offset = start
    step = 1 << (rows.bit_length() - 1)
    while step >= 1:
        @pl.when(size & step != 0)
        def _store(offset=offset, step=step):
            plgpu.copy_smem_to_gmem(src_ref.at[pl.ds(offset, step)], dst_ref.at[pl.ds(first_row + offset, step)],
                                    commit_group=False)
        offset = offset + (size & step)
        step //= 2


def store_tile(tile_NJ, out_smem, dst_ref, first_row, row_range=None):
    """Write the register tile [N, J] to rows first_row.. of `dst_ref` (a [rows, J] GMEM window) via SMEM + TMA.

    out_smem: [slots, N, j] SMEM with J a multiple of j; the tile goes out in J/j column chunks, alternating
    between the slots so a chunk's store overlaps the next chunk's SMEM write. row_range=(lo, hi) stores only
    those rows (out_smem must then be unswizzled, because the row offsets are arbitrary).
    """
    slots, _, chunk = out_smem.shape
    rows, cols = tile_NJ.shape
    for c in range(cols // chunk):
        slot = c % slots
        if c >= slots:
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
        out_smem[slot] = tile_NJ[:, c * chunk:(c + 1) * chunk]
        plgpu.commit_smem()
        dst_c = dst_ref.at[:, pl.ds(c * chunk, chunk)]
        if row_range is None:
            plgpu.copy_smem_to_gmem(out_smem.at[slot], dst_c.at[pl.ds(first_row, rows)], commit_group=False)
        else:
            _store_row_range(out_smem.at[slot], dst_c, first_row, *row_range)
        plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def zeros_tile(rows: int, cols: int, dtype, interpret: bool):
    return wgmma_layout(jnp.zeros((rows, cols), dtype), interpret)


def row_vector(ref, interpret: bool):
    """A (R,) SMEM vector in the layout that broadcasts along the columns of a WGMMA (R, C) tile."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))


def col_vector(ref, interpret: bool):
    """A (C,) SMEM vector in the layout that broadcasts along the rows of a WGMMA (R, C) tile."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))


def mask_rows(ref, lo, hi, interpret: bool):
    """Zero the rows outside [lo, hi) of an SMEM tile in place (a select, so NaN/Inf there do not leak)."""
    tile = ref[...]
    row = wgmma_layout(lax.broadcasted_iota(jnp.int32, tile.shape, 0), interpret)
    ref[...] = jnp.where((row >= lo) & (row < hi), tile, jnp.zeros_like(tile))


def kernel_call(body, out_type, *, num_ctas: int, compute_wgs: int, interpret):
    """A persistent kernel: `num_ctas` CTAs (grid axis "cta"), each compute_wgs + 1 warpgroups (axis "wg").
    No cost estimate: plgpu.kernel takes none and Mosaic GPU's lowering drops one (JAX 0.10)."""
    return plgpu.kernel(
        body, out_type=out_type, grid=(num_ctas,), grid_names=("cta",), num_threads=compute_wgs + 1,
        thread_name="wg", interpret=interpret,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
