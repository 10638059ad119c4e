"""Grouped matmul for Hopper GPUs: persistent, warp-specialized Mosaic GPU Pallas kernels (TMA into an SMEM ring, WGMMA
into float32 registers) behind the five functions of the gmm protocol; any N, C, J (zero-padded to whole tiles).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import gpu_mosaic as mg
from pallas_kernels.grouped_matmul.gpu_schedule import group_row_ranges, row_tile_items
from pallas_kernels.vma import vary_like

FP8_DTYPE = jnp.float8_e4m3fn
SCALE_BLOCK = 128        # FP8 scales cover 128 elements of the contraction (and 128 weight rows)
H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class GpuTiling:
    """Tile sizes of one kernel launch.

    The kernels are persistent: `num_ctas` CTAs walk a list of output tiles. A CTA has `compute_wgs` consumer
    warpgroups and one producer warpgroup; per tile the producer streams operand tiles with TMA into a
    `stages`-deep ring of swizzled SMEM buffers, the consumers multiply them with WGMMA into float32 register
    accumulators and store the result through SMEM with TMA. Operands are zero-padded to whole tiles where needed
    and the result sliced back, so any N, C, J work.

    block_m, block_n: output tile of a CTA (row kernel: token rows x output columns; weight-gradient kernel:
      rows x columns of dw[g]). compute_wgs consumer warpgroups split it along `wg_split` ("m" or "n"); each
      warpgroup's tile needs rows a multiple of 64 and columns a multiple of 8, at most 256.
    block_k: contraction per pipeline step (row kernel: C columns; weight gradient: token rows); 128 for FP8.
    stages: depth of the TMA -> SMEM ring.
    epilogue_n: columns per epilogue TMA store (None: a warpgroup's whole tile); smaller saves SMEM.
    num_ctas: persistent CTAs looping over the output tiles (None: the GPU's SM count, 132 (H100 SXM) when
      lowering elsewhere, and 1 in interpret mode, whose cost grows with the CTA count).
    memory_registers: registers per thread the producer warpgroup keeps (setmaxnreg; the consumers share the
      rest). The producer runs the whole tile loop's bookkeeping too, so too few spill (ptxas -v shows it).
    """
    block_m: int
    block_n: int
    block_k: int
    stages: int
    compute_wgs: int = 2
    wg_split: str = "n"
    epilogue_n: int | None = None
    num_ctas: int | None = None
    memory_registers: int = 40

    @property
    def wg_tile(self) -> tuple[int, int]:
        if self.compute_wgs == 1:
            return self.block_m, self.block_n
        if self.wg_split == "m":
            return self.block_m // self.compute_wgs, self.block_n
        return self.block_m, self.block_n // self.compute_wgs


# H100 defaults for DeepSeek-V3's expert shapes (C 7168 -> J 2048 and C 2048 -> J 7168, ~1024 rows per group).
# BF16: 128x256 CTA tiles, one 128x128 float32 accumulator per consumer warpgroup (as JAX's Hopper matmul).
# FP8: 128x128 CTA tiles split by rows, so accumulator + partial (2 x 64 registers) fit; 4 x 32 KiB stages.
# The FP8 row kernel's producer keeps 72 registers: with 40 its share of the tile loop spills (ptxas, H100 AOT).
DEFAULT_TILING = {
    "gmm": GpuTiling(block_m=128, block_n=256, block_k=64, stages=3, compute_wgs=2, wg_split="n"),
    "gmm_fp8": GpuTiling(block_m=128, block_n=128, block_k=128, stages=4, compute_wgs=2, wg_split="m",
                         memory_registers=72),
    "tgmm": GpuTiling(block_m=128, block_n=128, block_k=64, stages=4, compute_wgs=2, wg_split="n"),
    "tgmm_fp8": GpuTiling(block_m=128, block_n=128, block_k=128, stages=4, compute_wgs=2, wg_split="m"),
}


def _num_ctas(t: GpuTiling, interpret) -> int:
    if t.num_ctas is not None:
        return t.num_ctas
    if interpret is not None:
        return 1
    device = jax.devices()[0]
    return device.core_count if device.platform == "gpu" else H100_SMS


def _pad_axis(x, axis: int, multiple: int, value=0):
    extra = pl.cdiv(x.shape[axis], multiple) * multiple - x.shape[axis]
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads, constant_values=value)


def _check_tiling(t: GpuTiling, kind: str, in_dtype, out_dtype) -> None:
    """Raise ValueError naming the field at fault when `t` cannot run `kind` on an H100."""
    fp8 = kind.endswith("fp8")
    wm, wn = t.wg_tile
    if t.num_ctas is not None and t.num_ctas < 1:
        raise ValueError(f"GpuTiling.num_ctas must be >= 1, got {t.num_ctas}")
    if t.compute_wgs not in (1, 2):
        raise ValueError(f"GpuTiling.compute_wgs must be 1 or 2, got {t.compute_wgs}")
    if t.wg_split not in ("m", "n"):
        raise ValueError(f"GpuTiling.wg_split must be 'm' or 'n', got {t.wg_split!r}")
    split = t.block_m if (t.wg_split == "m" and t.compute_wgs > 1) else t.block_n
    if t.compute_wgs > 1 and split % t.compute_wgs:
        raise ValueError(f"GpuTiling: block_{t.wg_split}={split} must split evenly over {t.compute_wgs} warpgroups")
    if wm % 64:
        raise ValueError(f"GpuTiling.block_m: a warpgroup tile has {wm} rows; WGMMA needs a multiple of 64")
    if wn % 8 or not 8 <= wn <= 256:
        raise ValueError(f"GpuTiling.block_n: a warpgroup tile has {wn} columns; WGMMA needs 8..256, a multiple of 8")
    if fp8 and t.block_k != SCALE_BLOCK:
        raise ValueError(f"GpuTiling.block_k must be {SCALE_BLOCK} for FP8 (one scale per step), got {t.block_k}")
    if fp8 and kind == "gmm_fp8" and SCALE_BLOCK % wn:
        raise ValueError(f"GpuTiling.block_n: FP8 warpgroup tiles need 128 % columns == 0 (one weight scale), got {wn}")
    if t.block_k % 16 or t.block_k * jnp.dtype(in_dtype).itemsize < 32:
        raise ValueError(f"GpuTiling.block_k must be a multiple of 16 and span >= 32 bytes, got {t.block_k}")
    if kind == "tgmm" and t.block_k % 64:
        raise ValueError(f"GpuTiling.block_k must be a multiple of 64 for tgmm (group-boundary chunks are masked "
                         f"in WGMMA-layout registers), got {t.block_k}")
    if kind == "tgmm":
        for name, size in (("block_m", t.block_m), ("block_n", t.block_n)):
            if (size // t.compute_wgs) % 64:
                raise ValueError(f"GpuTiling.{name}={size}: the weight-gradient kernel masks {t.compute_wgs} "
                                 "column shares of each operand, each must be a multiple of 64")
    if t.stages < 1:
        raise ValueError(f"GpuTiling.stages must be >= 1, got {t.stages}")
    if t.memory_registers % 8 or not 24 <= t.memory_registers <= 256:
        raise ValueError(f"GpuTiling.memory_registers must be a multiple of 8 in [24, 256], got {t.memory_registers}")
    epi = t.epilogue_n or wn
    if wn % epi or (epi * jnp.dtype(out_dtype).itemsize) % 16:
        raise ValueError(f"GpuTiling.epilogue_n={epi} must divide the warpgroup tile's {wn} columns and span a "
                         "multiple of 16 bytes")
    smem = _smem_bytes(t, kind, in_dtype, out_dtype)
    if smem > mg.SMEM_BYTES:
        raise ValueError(f"GpuTiling {t} needs ~{smem} bytes of shared memory for {kind}; an H100 block has "
                         f"{mg.SMEM_BYTES}: lower stages, block sizes or epilogue_n")


def _smem_bytes(t: GpuTiling, kind: str, in_dtype, out_dtype) -> int:
    """Operand ring + FP8 scale vectors + epilogue buffers (barriers and alignment are a few hundred bytes)."""
    wm, wn = t.wg_tile
    epi = t.epilogue_n or wn
    scales = 0
    if kind.endswith("fp8"):
        scales = 4 * (t.block_m + t.block_n) if kind.startswith("tgmm") else 4 * t.block_m
    stage = (t.block_m + t.block_n) * t.block_k * jnp.dtype(in_dtype).itemsize + scales
    return t.stages * stage + t.compute_wgs * min(2, wn // epi) * wm * epi * jnp.dtype(out_dtype).itemsize


def _fitted_default(kind: str, in_dtype, out_dtype) -> GpuTiling:
    """DEFAULT_TILING[kind] with the epilogue chunk halved until it fits (wide outputs such as float32)."""
    t = DEFAULT_TILING[kind]
    while (_smem_bytes(t, kind, in_dtype, out_dtype) > mg.SMEM_BYTES
           and (t.epilogue_n or t.wg_tile[1]) * jnp.dtype(out_dtype).itemsize > 32):
        t = dataclasses.replace(t, epilogue_n=(t.epilogue_n or t.wg_tile[1]) // 2)
    return t


def _tiling(tiling, kind, in_dtype, out_dtype) -> GpuTiling:
    t = _fitted_default(kind, in_dtype, out_dtype) if tiling is None else tiling
    if not isinstance(t, GpuTiling):
        raise ValueError(f"tiling must be a GpuTiling, got {type(t).__name__}")
    _check_tiling(t, kind, in_dtype, out_dtype)
    return t


def _operand_dtype(x, name):
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"gpu grouped matmul: {name} must be bfloat16 or float16, got {x.dtype}")
    return x.dtype


def _wg_slices(t: GpuTiling, wg):
    """(row slice, column slice) of a warpgroup's part of the CTA tile, as pl.ds or full slices."""
    wm, wn = t.wg_tile
    split_m = t.compute_wgs > 1 and t.wg_split == "m"
    split_n = t.compute_wgs > 1 and t.wg_split == "n"
    rows = pl.ds(wg * wm, wm) if split_m else slice(None)
    cols = pl.ds(wg * wn, wn) if split_n else slice(None)
    return rows, cols, (wg * wm if split_m else 0), (wg * wn if split_n else 0)


# ----------------------------------------------------------------------------------------------------------------
# Row kernel: out[rows of g] = a[rows of g] @ B_g, B_g stored (C, J) ("kn") or (J, C) ("nk").
# ----------------------------------------------------------------------------------------------------------------

def _row_kernel(a_NC, b_EX, group_sizes_E, scales, *, b_layout: str, t: GpuTiling, out_dtype, interpret):
    """gmm / gmm_t / gmm_fp8: tiles are (work item, J tile) pairs. A work item is a (group, row tile) pair from
    gpu_schedule.row_tile_items: a row tile straddling a group boundary is computed once per group it touches and each
    pass stores only its own rows. Rows past sum(group_sizes) form a pseudo-group storing zeros. FP8: per 128-wide
    contraction block, E4M3 WGMMA into a fresh float32 partial accumulator, waited for, then
    acc += partial * a_scale * b_scale (DeepSeek-V3's promotion); weights stored (J, C), contraction-major, as FP8
    WGMMA needs."""
    N, C = a_NC.shape
    E = b_EX.shape[0]
    J = b_EX.shape[2] if b_layout == "kn" else b_EX.shape[1]
    bm, bn, bk = t.block_m, t.block_n, t.block_k
    wm, wn = t.wg_tile
    wgs = t.compute_wgs
    fp8 = scales is not None
    k_steps, n_tiles = C // bk, J // bn
    dtype = a_NC.dtype
    epi = t.epilogue_n or wn
    emulate = interpret is not None   # interpret mode: no register layouts (transposed operands work, see mg)
    items = row_tile_items(group_sizes_E, N, bm)
    num_items = items[0].shape[0]
    a_swizzle = mg.swizzled(bk, dtype)
    b_swizzle = mg.swizzled(bn if b_layout == "kn" else bk, dtype)

    def in_specs(tile, nt):
        specs = [plgpu.BlockSpec((bm, bk), lambda k: (tile, k), transforms=a_swizzle)]
        if b_layout == "kn":
            specs.append(plgpu.BlockSpec((bk, bn), lambda k: (k, nt), transforms=b_swizzle))
        else:
            specs.append(plgpu.BlockSpec((bn, bk), lambda k: (nt, k), transforms=b_swizzle))
        if fp8:
            specs.append(plgpu.BlockSpec((None, bm), lambda k: (k, tile)))
        return specs

    def pipeline(specs, num_steps, step, context):
        return plgpu.emit_pipeline_warp_specialized(
            step, grid=(num_steps,), memory_registers=t.memory_registers, in_specs=specs, wg_axis="wg",
            num_compute_wgs=wgs, max_concurrent_steps=t.stages, compute_context=context)

    def body(seg_ref, tile_ref, lo_ref, hi_ref, a_gmem, b_gmem, *refs):
        if fp8:
            sa_gmem, sb_gmem, out_gmem = refs
        else:
            (out_gmem,) = refs
        wg = lax.axis_index("wg")
        wg_rows, wg_cols, row_off, col_off = _wg_slices(t, wg)
        gmem_in = lambda seg: [a_gmem, b_gmem.at[jnp.minimum(seg, E - 1)]] + ([sa_gmem] if fp8 else [])
        ignore = lambda *_, **__: None
        zero = jnp.int32(0)
        allocs = dict(pipe=pipeline(in_specs(zero, zero), k_steps, ignore, ignore).get_allocations(*gmem_in(zero)),
                      out_smem=plgpu.SMEM((wgs, min(2, wn // epi), wm, epi), out_dtype))

        def wg_b(b_s):
            return b_s.at[:, wg_cols] if b_layout == "kn" else b_s.at[wg_cols]

        def scope(pipe, out_smem):

            # Persistent CTAs walk the (item, J tile) list, J fastest: neighbours share rows and weights in L2.
            @plgpu.nd_loop((num_items * n_tiles,), collective_axes="cta")
            def _tile(loop):
                (lin,) = loop.index
                item, nt = lin // n_tiles, lin % n_tiles
                seg, tile, lo, hi = seg_ref[item], tile_ref[item], lo_ref[item], hi_ref[item]
                first_row, first_col = tile * bm + row_off, nt * bn + col_off
                dst = out_gmem.at[:, pl.ds(first_col, wn)]

                def epilogue(acc):
                    mg.store_tile(acc.astype(out_dtype), out_smem.at[wg], dst, first_row, (lo, hi))

                def bf16_step(_, a_s, b_s, acc_ref):
                    mg.wgmma(acc_ref, a_s.at[wg_rows], wg_b(b_s), a_transposed=False,
                             b_transposed=b_layout == "nk")
                    # Wait before the slot is released: the pipeline does not release a delayed last slot
                    # before the next tile's prologue refills it. The other warpgroup keeps the tensor cores busy.
                    plgpu.wgmma_wait(0)
                    return acc_ref

                bf16_context = mg.accumulator_context((wm, wn), epilogue)

                def fp8_step(idx, a_s, b_s, sa_s, acc_NJ):
                    (k,) = idx

                    def partial_scope(p_ref):
                        mg.wgmma(p_ref, a_s.at[wg_rows], wg_b(b_s), a_transposed=False, b_transposed=True)
                        return p_ref[...]
                    partial_NJ = pl.run_scoped(partial_scope, plgpu.ACC((wm, wn), jnp.float32))
                    scale_N = mg.row_vector(sa_s.at[wg_rows], emulate) * sb_gmem[seg, first_col // SCALE_BLOCK, k]
                    return acc_NJ + partial_NJ * lax.broadcast_in_dim(scale_N, (wm, wn), (0,))

                def fp8_context(run):
                    epilogue(run(mg.zeros_tile(wm, wn, jnp.float32, emulate)))

                # Rows past sum(group_sizes) (segment E) run no steps: the epilogue stores the zero accumulator.
                # Zeros are stored there, in the compute warpgroups' context, and not in a branch of this loop
                # body: the producer warpgroup runs the loop body too, with its few registers (setmaxnreg).
                @pl.when(hi > lo)
                def _matmul():
                    step, context = (fp8_step, fp8_context) if fp8 else (bf16_step, bf16_context)
                    num_steps = jnp.where(seg < E, k_steps, 0)
                    pipeline(in_specs(tile, nt), num_steps, step, context)(*gmem_in(seg), allocations=pipe)

        pl.run_scoped(scope, **allocs, collective_axes="wg")

    kernel = mg.kernel_call(body, jax.ShapeDtypeStruct((N, J), out_dtype), num_ctas=_num_ctas(t, interpret),
                            compute_wgs=wgs, interpret=interpret)
    operands = (*items, a_NC, b_EX, *(scales or ()))
    return vary_like(kernel(*operands), *operands)   # plgpu.kernel types its result as invariant


# ----------------------------------------------------------------------------------------------------------------
# Weight-gradient kernel: out[g] = A[:, rows of g] @ B[rows of g, :], contraction over the token rows.
# ----------------------------------------------------------------------------------------------------------------

def _wgrad_kernel(a, b, group_sizes_E, scales, *, num_rows: int, t: GpuTiling, out_dtype, interpret):
    """BF16: a = x (N, C), b = dy (N, J). FP8: a = a_q (C, N), b = b_q (J, N), scales = (sa (Nb, C), sb (Nb, J)).

    tgmm / tgmm_fp8: tiles are (group, C tile, J tile); a tile contracts over its group's rows in `block_k`-row
    chunks. BF16 zeroes the other groups' rows of a group's first and last chunk in SMEM; FP8 promotes per 128 rows
    as the row kernel does per 128 of C."""
    fp8 = scales is not None
    C = a.shape[0] if fp8 else a.shape[1]
    J = b.shape[0] if fp8 else b.shape[1]
    E = group_sizes_E.shape[0]
    bm, bn, bk = t.block_m, t.block_n, t.block_k
    wm, wn = t.wg_tile
    wgs = t.compute_wgs
    n_tiles, k_tiles = J // bn, C // bm
    dtype = a.dtype
    epi = t.epilogue_n or wn
    emulate = interpret is not None   # interpret mode: no register layouts (transposed operands work, see mg)
    start_E, end_E = group_row_ranges(group_sizes_E, num_rows)

    def in_specs(first, kt, nt):
        if fp8:
            return [plgpu.BlockSpec((bm, bk), lambda c: (kt, first + c), transforms=mg.swizzled(bk, dtype)),
                    plgpu.BlockSpec((bn, bk), lambda c: (nt, first + c), transforms=mg.swizzled(bk, dtype)),
                    plgpu.BlockSpec((None, bm), lambda c: (first + c, kt)),
                    plgpu.BlockSpec((None, bn), lambda c: (first + c, nt))]
        return [plgpu.BlockSpec((bk, bm), lambda c: (first + c, kt), transforms=mg.swizzled(bm, dtype)),
                plgpu.BlockSpec((bk, bn), lambda c: (first + c, nt), transforms=mg.swizzled(bn, dtype))]

    def pipeline(specs, num_chunks, step, context):
        return plgpu.emit_pipeline_warp_specialized(
            step, grid=(num_chunks,), memory_registers=t.memory_registers, in_specs=specs, wg_axis="wg",
            num_compute_wgs=wgs, max_concurrent_steps=t.stages, compute_context=context)

    def body(start_ref, end_ref, a_gmem, b_gmem, *refs):
        if fp8:
            sa_gmem, sb_gmem, out_gmem = refs
            gmem_in = [a_gmem, b_gmem, sa_gmem, sb_gmem]
        else:
            (out_gmem,) = refs
            gmem_in = [a_gmem, b_gmem]
        wg = lax.axis_index("wg")
        wg_rows, wg_cols, row_off, col_off = _wg_slices(t, wg)
        ignore = lambda *_, **__: None
        zero = jnp.int32(0)
        allocs = dict(pipe=pipeline(in_specs(zero, zero, zero), t.stages, ignore, ignore).get_allocations(*gmem_in),
                      out_smem=plgpu.SMEM((wgs, min(2, wn // epi), wm, epi), out_dtype,
                                          transforms=mg.swizzled(epi, out_dtype)))
        if not fp8 and wgs > 1:
            allocs["mask_barrier"] = plgpu.Barrier(num_arrivals=wgs)

        def scope(pipe, out_smem, mask_barrier=None):

            # Persistent CTAs walk the (group, C tile, J tile) list, J fastest: neighbours share x's columns.
            @plgpu.nd_loop((E * k_tiles * n_tiles,), collective_axes="cta")
            def _tile(loop):
                (lin,) = loop.index
                g, kt, nt = lin // (k_tiles * n_tiles), lin // n_tiles % k_tiles, lin % n_tiles
                start, end = start_ref[g], end_ref[g]
                first = start // bk
                num_chunks = jnp.where(end > start, (end - 1) // bk - first + 1, 0)
                first_row, first_col = kt * bm + row_off, nt * bn + col_off
                dst = out_gmem.at[g].at[:, pl.ds(first_col, wn)]

                def epilogue(acc):
                    if fp8:   # precondition: groups are whole 128-row tiles; poison the result of any that is not
                        bad = (end - start) % SCALE_BLOCK != 0
                        acc = acc * jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(1))
                    mg.store_tile(acc.astype(out_dtype), out_smem.at[wg], dst, first_row)

                def bf16_step(idx, a_s, b_s, acc_ref):
                    (c,) = idx
                    row0 = (first + c) * bk

                    @pl.when((row0 < start) | (row0 + bk > end))
                    def _mask_other_groups():
                        # Each warpgroup zeroes its share of both tiles' columns, then waits for the others.
                        a_share, b_share = bm // wgs, bn // wgs
                        for ref, share in ((a_s, a_share), (b_s, b_share)):
                            mg.mask_rows(ref.at[:, pl.ds(wg * share, share)], start - row0, end - row0, emulate)
                        plgpu.commit_smem()
                        if mask_barrier is not None:
                            plgpu.barrier_arrive(mask_barrier)
                            plgpu.barrier_wait(mask_barrier)

                    mg.wgmma(acc_ref, a_s.at[:, wg_rows], b_s.at[:, wg_cols], a_transposed=True,
                             b_transposed=False)
                    plgpu.wgmma_wait(0)   # see the row kernel
                    return acc_ref

                bf16_context = mg.accumulator_context((wm, wn), epilogue)

                def fp8_step(_, a_s, b_s, sa_s, sb_s, acc_NJ):
                    def partial_scope(p_ref):
                        mg.wgmma(p_ref, a_s.at[wg_rows], b_s.at[wg_cols], a_transposed=False, b_transposed=True)
                        return p_ref[...]
                    partial_NJ = pl.run_scoped(partial_scope, plgpu.ACC((wm, wn), jnp.float32))
                    sa_N = mg.row_vector(sa_s.at[wg_rows], emulate)
                    sb_J = mg.col_vector(sb_s.at[wg_cols], emulate)
                    return acc_NJ + (partial_NJ * lax.broadcast_in_dim(sa_N, (wm, wn), (0,))
                                     * lax.broadcast_in_dim(sb_J, (wm, wn), (1,)))

                def fp8_context(run):
                    epilogue(run(mg.zeros_tile(wm, wn, jnp.float32, emulate)))

                # An empty group runs no steps and its epilogue stores dw[g] = 0 (see the row kernel on why here).
                step, context = (fp8_step, fp8_context) if fp8 else (bf16_step, bf16_context)
                pipeline(in_specs(first, kt, nt), num_chunks, step, context)(*gmem_in, allocations=pipe)

        pl.run_scoped(scope, **allocs, collective_axes="wg")

    kernel = mg.kernel_call(body, jax.ShapeDtypeStruct((E, C, J), out_dtype), num_ctas=_num_ctas(t, interpret),
                            compute_wgs=wgs, interpret=interpret)
    operands = (start_E, end_E, a, b, *(scales or ()))
    return vary_like(kernel(*operands), *operands)


# ----------------------------------------------------------------------------------------------------------------
# The protocol's five functions.
# ----------------------------------------------------------------------------------------------------------------

def _check_groups(group_sizes_E, E: int | None, fn: str):
    if group_sizes_E.ndim != 1 or (E is not None and group_sizes_E.shape[0] != E):
        raise ValueError(f"{fn}: group_sizes_E must have shape ({E if E is not None else 'E'},), "
                         f"got {group_sizes_E.shape}")
    if not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
        raise ValueError(f"{fn}: group_sizes_E must be integer, got {group_sizes_E.dtype}")
    return group_sizes_E.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("transpose_w", "out_dtype", "interpret", "tiling"))
def _gmm(x_NC, w_ECJ, group_sizes_E, *, transpose_w: bool, out_dtype, interpret, tiling):
    """transpose_w: dx = dy @ w[g].T, contracting over w's J (read contraction-major through a transposed SMEM view)."""
    t = tiling
    x = _pad_axis(_pad_axis(x_NC, 0, t.block_m), 1, t.block_k)
    w = w_ECJ.astype(x_NC.dtype)
    if transpose_w:
        w = _pad_axis(_pad_axis(w, 1, t.block_n), 2, t.block_k)
    else:
        w = _pad_axis(_pad_axis(w, 1, t.block_k), 2, t.block_n)
    y = _row_kernel(x, w, group_sizes_E, None, b_layout="nk" if transpose_w else "kn", t=t, out_dtype=out_dtype,
                    interpret=interpret)
    return y[:x_NC.shape[0], :w_ECJ.shape[1 if transpose_w else 2]]


def _checked_gmm(name, rows_NC, w_ECJ, group_sizes_E, *, transpose_w, out_dtype, interpret, tiling):
    """gmm / gmm_t after their checks: rows_NC contracts with w's C (gmm) or J (gmm_t, w transposed)."""
    E, contraction = w_ECJ.shape[0], w_ECJ.shape[2 if transpose_w else 1]
    rows_name = "dy_NJ" if transpose_w else "x_NC"
    if rows_NC.shape[1] != contraction:
        raise ValueError(f"{name}: {rows_name} is {rows_NC.shape} but w_ECJ is {w_ECJ.shape}: contraction sizes "
                         "differ")
    sizes = _check_groups(group_sizes_E, E, name)
    t = _tiling(tiling, "gmm", _operand_dtype(rows_NC, rows_name), out_dtype)
    return _gmm(rows_NC, w_ECJ, sizes, transpose_w=transpose_w, out_dtype=jnp.dtype(out_dtype),
                interpret=mg.interpret_params(interpret), tiling=t)


def gmm(x_NC, w_ECJ, group_sizes_E, *, out_dtype, interpret=False, tiling: GpuTiling | None = None):
    """y[rows of g] = x[rows of g] @ w[g] (rows past sum(group_sizes) are 0). w is cast to x's dtype."""
    return _checked_gmm("gmm", x_NC, w_ECJ, group_sizes_E, transpose_w=False, out_dtype=out_dtype,
                        interpret=interpret, tiling=tiling)


def gmm_t(dy_NJ, w_ECJ, group_sizes_E, *, out_dtype, interpret=False, tiling: GpuTiling | None = None):
    """dx[rows of g] = dy[rows of g] @ w[g].T (rows past sum(group_sizes) are 0). w is cast to dy's dtype."""
    return _checked_gmm("gmm_t", dy_NJ, w_ECJ, group_sizes_E, transpose_w=True, out_dtype=out_dtype,
                        interpret=interpret, tiling=tiling)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "tiling"))
def _gmm_fp8(a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E, *, out_dtype, interpret, tiling):
    t = tiling
    N, J = a_q_NC.shape[0], b_q_EJC.shape[1]
    a = _pad_axis(_pad_axis(a_q_NC, 0, t.block_m), 1, SCALE_BLOCK)
    b = _pad_axis(_pad_axis(b_q_EJC, 1, t.block_n), 2, SCALE_BLOCK)
    sa_CbN = _pad_axis(a_scale_NCb.astype(jnp.float32), 0, t.block_m).T
    # A warpgroup reads the scale of its first column's 128-block, which for padded columns can be past Jb.
    sb = b_scale_EJbCb.astype(jnp.float32)
    sb = jnp.pad(sb, ((0, 0), (0, max(pl.cdiv(b.shape[1], SCALE_BLOCK) - sb.shape[1], 0)), (0, 0)))
    y = _row_kernel(a, b, group_sizes_E, (sa_CbN, sb), b_layout="nk", t=t, out_dtype=out_dtype,
                    interpret=interpret)
    return y[:N, :J]


def gmm_fp8(a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E, *, out_dtype, interpret=False,
            tiling: GpuTiling | None = None):
    """y[rows of g] = dequant(a)[rows of g] @ dequant(b[g]).T, promoted to float32 every 128 of C.

    a: 1x128 tiles (a_scale_NCb [N, ceil(C/128)]); b stored (J, C) with 128x128 block scales [E, Jb, Cb].
    """
    N, C = a_q_NC.shape
    E, J, C2 = b_q_EJC.shape
    Cb, Jb = pl.cdiv(C, SCALE_BLOCK), pl.cdiv(J, SCALE_BLOCK)
    if C != C2:
        raise ValueError(f"gmm_fp8: a_q_NC is {a_q_NC.shape} but b_q_EJC is {b_q_EJC.shape}: contraction differs")
    for name, x in (("a_q_NC", a_q_NC), ("b_q_EJC", b_q_EJC)):
        if x.dtype != FP8_DTYPE:
            raise ValueError(f"gmm_fp8: {name} must be float8_e4m3fn, got {x.dtype}")
    if a_scale_NCb.shape != (N, Cb):
        raise ValueError(f"gmm_fp8: a_scale_NCb must be {(N, Cb)}, got {a_scale_NCb.shape}")
    if b_scale_EJbCb.shape != (E, Jb, Cb):
        raise ValueError(f"gmm_fp8: b_scale_EJbCb must be {(E, Jb, Cb)}, got {b_scale_EJbCb.shape}")
    sizes = _check_groups(group_sizes_E, E, "gmm_fp8")
    t = _tiling(tiling, "gmm_fp8", FP8_DTYPE, out_dtype)
    return _gmm_fp8(a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, sizes, out_dtype=jnp.dtype(out_dtype),
                    interpret=mg.interpret_params(interpret), tiling=t)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "tiling"))
def _tgmm(x_NC, dy_NJ, group_sizes_E, *, out_dtype, interpret, tiling):
    t = tiling
    (N, C), J = x_NC.shape, dy_NJ.shape[1]
    x = _pad_axis(_pad_axis(x_NC, 0, t.block_k), 1, t.block_m)
    dy = _pad_axis(_pad_axis(dy_NJ.astype(x_NC.dtype), 0, t.block_k), 1, t.block_n)
    dw = _wgrad_kernel(x, dy, group_sizes_E, None, num_rows=N, t=t, out_dtype=out_dtype, interpret=interpret)
    return dw[:, :C, :J]


def tgmm(x_NC, dy_NJ, group_sizes_E, *, out_dtype, interpret=False, tiling: GpuTiling | None = None):
    """dw[g] = x[rows of g].T @ dy[rows of g]; zeros for empty groups. dy is cast to x's dtype."""
    N, _ = x_NC.shape
    if dy_NJ.ndim != 2 or dy_NJ.shape[0] != N:
        raise ValueError(f"tgmm: dy_NJ must be [N={N}, J], got {dy_NJ.shape}")
    sizes = _check_groups(group_sizes_E, None, "tgmm")
    t = _tiling(tiling, "tgmm", _operand_dtype(x_NC, "x_NC"), out_dtype)
    return _tgmm(x_NC, dy_NJ, sizes, out_dtype=jnp.dtype(out_dtype), interpret=mg.interpret_params(interpret),
                 tiling=t)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "tiling"))
def _tgmm_fp8(a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E, *, out_dtype, interpret, tiling):
    t = tiling
    (C, N), J = a_q_CN.shape, b_q_JN.shape[0]
    a = _pad_axis(_pad_axis(a_q_CN, 0, t.block_m), 1, SCALE_BLOCK)
    b = _pad_axis(_pad_axis(b_q_JN, 0, t.block_n), 1, SCALE_BLOCK)
    sa_NbC = _pad_axis(a_scale_CNb.astype(jnp.float32), 0, t.block_m).T
    sb_NbJ = _pad_axis(b_scale_JNb.astype(jnp.float32), 0, t.block_n).T
    dw = _wgrad_kernel(a, b, group_sizes_E, (sa_NbC, sb_NbJ), num_rows=N, t=t, out_dtype=out_dtype,
                       interpret=interpret)
    return dw[:, :C, :J]


def tgmm_fp8(a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E, *, out_dtype, interpret=False,
             tiling: GpuTiling | None = None):
    """dw[g] = dequant(a)[:, rows of g] @ dequant(b)[:, rows of g].T, promoted to float32 every 128 rows.

    a = x.T, b = dy.T, quantized in 1x128 tiles along N. Every group size must be a multiple of 128 (checked
    here when the sizes are concrete; otherwise a group that breaks it gets NaN in its dw).
    """
    C, N = a_q_CN.shape
    J, N2 = b_q_JN.shape
    Nb = pl.cdiv(N, SCALE_BLOCK)
    if N != N2:
        raise ValueError(f"tgmm_fp8: a_q_CN is {a_q_CN.shape} but b_q_JN is {b_q_JN.shape}: row counts differ")
    for name, x in (("a_q_CN", a_q_CN), ("b_q_JN", b_q_JN)):
        if x.dtype != FP8_DTYPE:
            raise ValueError(f"tgmm_fp8: {name} must be float8_e4m3fn, got {x.dtype}")
    if a_scale_CNb.shape != (C, Nb):
        raise ValueError(f"tgmm_fp8: a_scale_CNb must be {(C, Nb)}, got {a_scale_CNb.shape}")
    if b_scale_JNb.shape != (J, Nb):
        raise ValueError(f"tgmm_fp8: b_scale_JNb must be {(J, Nb)}, got {b_scale_JNb.shape}")
    sizes = _check_groups(group_sizes_E, None, "tgmm_fp8")
    try:
        concrete = np.asarray(group_sizes_E)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        concrete = None
    if concrete is not None:
        bad = [int(s) for s in concrete if int(s) % SCALE_BLOCK]
        if bad:
            raise ValueError(f"tgmm_fp8: group_sizes_E must be multiples of {SCALE_BLOCK}, got sizes {bad}")
    t = _tiling(tiling, "tgmm_fp8", FP8_DTYPE, out_dtype)
    return _tgmm_fp8(a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, sizes, out_dtype=jnp.dtype(out_dtype),
                     interpret=mg.interpret_params(interpret), tiling=t)
