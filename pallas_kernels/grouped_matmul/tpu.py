"""Grouped matmuls as TPU Pallas kernels (megablox technique: a scalar-prefetched list of (group, row tile) visits),
same math as `reference`; any N, C, J (operands zero-padded to whole tiles, results sliced back).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cost import cost_estimate, nbytes
from pallas_kernels.fp8.quantize import TILE
from pallas_kernels.grouped_matmul import reference
from pallas_kernels.grouped_matmul.layout import group_bounds
from pallas_kernels.tpu_lanes import div_nonneg, pick_column, pick_row, rem_nonneg
from pallas_kernels.vma import out_struct

_SQUEEZED = pl.Squeezed() if hasattr(pl, "Squeezed") else None
_POW2_TILES = (128, 256, 512, 1024)
_NN = (((1,), (0,)), ((), ()))     # [m, c] · [c, n]
_NT = (((1,), (1,)), ((), ()))     # [m, c] · [n, c]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Preferred tile sizes. `m` and `k` are 128·2^i up to 1024 (so one tile's FP8 scales lie in one scale block),
    `n` any multiple of 128. Rows are padded to a multiple of the row tile (`m`, halved while that still covers
    all rows); `k` and `n` are halved down to 128 until they divide the dim rounded up to 128."""
    m: int = 256     # rows of the grouped operand
    k: int = 512     # contraction of the row kernels / first output dim of the weight kernels
    n: int = 512     # output columns

    def __post_init__(self):
        for name, allowed in (("m", _POW2_TILES), ("k", _POW2_TILES), ("n", None)):
            value = getattr(self, name)
            if (value not in allowed) if allowed else (value < TILE or value % TILE):
                want = f"one of {allowed}" if allowed else f"a positive multiple of {TILE}"
                raise ValueError(f"BlockSizes.{name} must be {want}, got {value}")


def _round_up(a: int, b: int) -> int:
    return pl.cdiv(a, b) * b


def _block(size: int, preferred: int) -> int:
    """The largest of preferred, preferred/2, ..., 128 that divides `size` (a multiple of 128)."""
    b = preferred
    while b > TILE and size % b:
        b //= 2
    return b


def _row_block(N: int, preferred: int) -> int:
    """Row tile: `preferred`, halved (down to 128) while half still covers N. Rows are padded to a multiple of it:
    the row count is the routing's, often without useful factors, unlike the model dims C and J."""
    b = preferred
    while b > TILE and b // 2 >= N:
        b //= 2
    return b


def _pad2(x, rows: int, cols: int):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _visits(group_sizes_E, N: int, bm: int, n_tiles: int, *, tail_tiles: bool, empty_groups: bool):
    """int32 [Y] arrays (group, row tile, lo, hi) of Y = n_tiles + E - 1 visits; rows [lo, hi) of the tile are the
    group's (lo == hi: nothing to compute). `tail_tiles`: also visit tiles past the groups (row kernels zero
    them). `empty_groups`: visit every group at least once (weight kernels zero theirs).

    Built in jnp from group_sizes and handed to the kernels by scalar prefetch: one visit per (group, row tile it
    touches), in row order. A tile that straddles a group boundary is visited once per group it holds,
    consecutively, so its output block stays in VMEM across those visits. At most n_tiles + E - 1 visits for
    n_tiles row tiles and E groups: that static bound is the grid size, and the unused visits at the end do
    nothing."""
    E = group_sizes_E.shape[0]
    starts_E, ends_E = group_bounds(group_sizes_E, N)
    nonempty_E = ends_E > starts_E
    first_E = jnp.minimum(starts_E // bm, n_tiles - 1)
    last_E = jnp.maximum(ends_E - 1, 0) // bm
    count_E = jnp.where(nonempty_E, last_E - first_E + 1, 1 if empty_groups else 0)
    cum_E = jnp.cumsum(count_E)
    real = cum_E[-1]
    v_Y = jnp.arange(n_tiles + E - 1, dtype=jnp.int32)
    g_Y = jnp.minimum(jnp.searchsorted(cum_E, v_Y, side="right"), E - 1).astype(jnp.int32)
    tile_Y = first_E[g_Y] + v_Y - (cum_E[g_Y] - count_E[g_Y])
    in_groups_Y = v_Y < real
    lo_Y = jnp.where(in_groups_Y, jnp.maximum(starts_E[g_Y], tile_Y * bm), 0)
    hi_Y = jnp.where(in_groups_Y, jnp.minimum(ends_E[g_Y], (tile_Y + 1) * bm), 0)
    if tail_tiles:     # tiles no group reaches, then repeats of the last tile (n_tiles - 1), which do nothing
        tail_Y = pl.cdiv(ends_E[-1], bm) + v_Y - real
        tile_Y = jnp.where(in_groups_Y, tile_Y, jnp.minimum(tail_Y, n_tiles - 1))
    else:              # repeats of the last visit's tile (that of group E - 1)
        tile_Y = jnp.where(in_groups_Y, tile_Y, tile_Y[jnp.maximum(real - 1, 0)])
    return tuple(a.astype(jnp.int32) for a in (g_Y, tile_Y, lo_Y, hi_Y))


def _row_mask(tile, lo, hi, shape, bm: int):
    rows = tile * bm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= lo) & (rows < hi)


def _row_kernel(group_ref, tile_ref, lo_ref, hi_ref, *refs, bm: int, dims, scaled: bool, compute_dtype):
    if scaled:
        lhs_ref, rhs_ref, sa_ref, sb_ref, out_ref, acc_ref = refs
    else:
        lhs_ref, rhs_ref, out_ref, acc_ref = refs
    del group_ref
    v, k = pl.program_id(1), pl.program_id(2)
    tile, lo, hi = tile_ref[v], lo_ref[v], hi_ref[v]
    busy = lo < hi

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(busy)
    def _accumulate():
        if not scaled:
            acc_ref[...] += jax.lax.dot_general(lhs_ref[...].astype(compute_dtype), rhs_ref[...].astype(compute_dtype),
                                                dims, preferred_element_type=jnp.float32)
            return
        acc, sa, sb = acc_ref[...], sa_ref[...], sb_ref[...]
        for s in range(lhs_ref.shape[1] // TILE):    # promotion: one scaled float32 partial per 128 of C
            cols, kb = slice(s * TILE, (s + 1) * TILE), k * (lhs_ref.shape[1] // TILE) + s
            partial = jax.lax.dot_general(lhs_ref[:, cols].astype(jnp.bfloat16),
                                          rhs_ref[:, cols].astype(jnp.bfloat16), _NT,
                                          preferred_element_type=jnp.float32)
            acc = acc + partial * pick_column(sa, rem_nonneg(kb, TILE)) * pick_row(sb, rem_nonneg(kb, 8))
        acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        mask = _row_mask(tile, lo, hi, acc_ref.shape, bm)
        first = (v == 0) | (tile_ref[jnp.maximum(v - 1, 0)] != tile)

        @pl.when(first)
        def _first_visit_of_tile():
            out_ref[...] = jnp.where(mask, acc_ref[...], 0.0).astype(out_ref.dtype)

        @pl.when(jnp.logical_not(first) & busy)
        def _later_visit_of_tile():
            out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _row_call(lhs_NC, rhs, group_sizes_E, scales, *, rhs_nc: bool, J: int, out_dtype, interpret: bool,
              bs: BlockSizes):
    """The row kernels. rhs is [E, C, J] (rhs_nc False) or [E, J, C]; scales None or (a_scale [N, Cb],
    b_scale [E, Jb, Cb]) for FP8 operands.

    gmm, gmm_t and gmm_fp8 run over (J tiles, visits, contraction tiles): a float32 accumulator per visit, then the
    rows of the visit's group are stored (the first visit of a tile zeroes the rest). Row tiles past the groups get
    a visit of their own that writes zeros. FP8 tiles are upcast to bf16 (exact) for the MXU; each 128 of the
    contraction is its own dot, scaled by its (rows, 1) and (1, cols) scale vectors before joining the float32
    accumulator. The vectors are picked (one-hot sums) from lane-dense scale blocks: TPU memory pads an array whose
    last dim is 1 to 128 lanes."""
    N, C = lhs_NC.shape
    bm = _row_block(N, bs.m)
    Np, Cp, Jp = _round_up(N, bm), _round_up(C, TILE), _round_up(J, TILE)
    bc, bo = _block(Cp, bs.k), _block(Jp, bs.n)
    n_tiles = Np // bm
    visits = _visits(group_sizes_E, N, bm, n_tiles, tail_tiles=True, empty_groups=False)
    lhs = _pad2(lhs_NC, Np, Cp)
    pads = ((0, 0), (0, Jp - J), (0, Cp - C)) if rhs_nc else ((0, 0), (0, Cp - C), (0, Jp - J))
    rhs = jnp.pad(rhs, pads)

    def kk(v, k, lo, hi):      # idle visits keep the contraction index still: no refetch
        return jnp.where(lo[v] < hi[v], k, 0)

    in_specs = [
        pl.BlockSpec((bm, bc), lambda j, v, k, g, t, lo, hi: (t[v], kk(v, k, lo, hi))),
        pl.BlockSpec((_SQUEEZED, bo, bc), lambda j, v, k, g, t, lo, hi: (g[v], j, kk(v, k, lo, hi))) if rhs_nc else
        pl.BlockSpec((_SQUEEZED, bc, bo), lambda j, v, k, g, t, lo, hi: (g[v], kk(v, k, lo, hi), j)),
    ]
    operands = [lhs, rhs]
    if scales is not None:
        a_scale_NCb, b_scale_EJbCb = scales
        Cb, bcb = Cp // TILE, bc // TILE       # bcb (1, 2, 4 or 8) divides 8 and 128: a step's scales share a block
        # a scales [Np, Cb → 128k]: a (bm, 128) block holds the (bm, 1) columns of 128 C blocks. b scales
        # repeated along J, [E, Cb → 8k, Jp]: an (8, bo) block holds the (1, bo) rows of 8 C blocks. (Shapes
        # whose last dim is 1, or second-last 1, would be padded 128× / 8× in TPU memory.)
        sa = _pad2(a_scale_NCb.astype(jnp.float32), Np, _round_up(Cb, TILE))
        sb = jnp.repeat(jnp.swapaxes(b_scale_EJbCb.astype(jnp.float32), 1, 2), TILE, axis=2)
        sb = jnp.pad(sb, ((0, 0), (0, _round_up(Cb, 8) - Cb), (0, 0)))
        in_specs += [
            pl.BlockSpec((bm, TILE), lambda j, v, k, g, t, lo, hi: (t[v], div_nonneg(kk(v, k, lo, hi) * bcb, TILE))),
            pl.BlockSpec((_SQUEEZED, 8, bo), lambda j, v, k, g, t, lo, hi: (g[v], div_nonneg(kk(v, k, lo, hi) * bcb, 8), j)),
        ]
        operands += [sa, sb]
    kernel = functools.partial(_row_kernel, bm=bm, dims=_NT if rhs_nc else _NN, scaled=scales is not None,
                               compute_dtype=jnp.promote_types(lhs.dtype, rhs.dtype))
    Y, Cb = visits[0].shape[0], Cp // TILE
    # From the row count, not per group: every row meets one weight matrix. Each visit streams its rows' tile
    # for every J tile and one weight tile column (C x J) per visit; FP8 adds 3 flops per output and C block.
    flops = 2 * N * Cp * Jp + (3 * N * Jp * Cb if scales is not None else 0)
    traffic = (nbytes(lhs, *operands[2:3]) * (Jp // bo) + Y * Cp * Jp * rhs.dtype.itemsize
               + (Y * nbytes(operands[3]) // rhs.shape[0] if scales is not None else 0)
               + Np * Jp * jnp.dtype(out_dtype).itemsize)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(Jp // bo, visits[0].shape[0], Cp // bc),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, bo), lambda j, v, k, g, t, lo, hi: (t[v], j)),
            scratch_shapes=[pltpu.VMEM((bm, bo), jnp.float32)],
        ),
        out_shape=out_struct((Np, Jp), out_dtype, *visits, *operands),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost_estimate(flops=flops, bytes_accessed=traffic),
        interpret=interpret,
    )(*visits, *operands)
    return out[:N, :J]


def _weight_kernel(group_ref, tile_ref, lo_ref, hi_ref, *refs, bm: int, scaled: bool, compute_dtype):
    if scaled:
        a_ref, b_ref, sa_ref, sb_ref, out_ref, acc_ref = refs
    else:
        a_ref, b_ref, out_ref, acc_ref = refs
    v, last_v = pl.program_id(2), pl.num_programs(2) - 1
    group, tile, lo, hi = group_ref[v], tile_ref[v], lo_ref[v], hi_ref[v]

    @pl.when((v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != group))
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(lo < hi)
    def _accumulate():
        if not scaled:    # a = x tile [bm, bk], b = dy tile [bm, bn]: rows of other groups masked to 0
            x = jnp.where(_row_mask(tile, lo, hi, a_ref.shape, bm), a_ref[...].astype(jnp.float32), 0.0)
            dy = jnp.where(_row_mask(tile, lo, hi, b_ref.shape, bm), b_ref[...].astype(jnp.float32), 0.0)
            # xᵀ by an explicit float32 transpose (well supported by Mosaic), then a plain [k, m] · [m, n] dot.
            acc_ref[...] += jax.lax.dot_general(x.T.astype(compute_dtype), dy.astype(compute_dtype), _NN,
                                                preferred_element_type=jnp.float32)
            return
        # a = xᵀ tile [bk, bm], b = dyᵀ tile [bn, bm]; groups are 128-aligned, so each 128 rows is in or out.
        sa, sb = sa_ref[...], sb_ref[...]
        for s in range(a_ref.shape[1] // TILE):
            mb = tile * (bm // TILE) + s     # the 128-row block: its scales' column in sa and row in sb

            @pl.when((mb * TILE >= lo) & (mb * TILE < hi))
            def _sub_tile():
                cols = slice(s * TILE, (s + 1) * TILE)
                partial = jax.lax.dot_general(a_ref[:, cols].astype(jnp.bfloat16), b_ref[:, cols].astype(jnp.bfloat16),
                                              _NT, preferred_element_type=jnp.float32)
                acc_ref[...] += partial * pick_column(sa, rem_nonneg(mb, TILE)) * pick_row(sb, rem_nonneg(mb, 8))

    @pl.when((v == last_v) | (group_ref[jnp.minimum(v + 1, last_v)] != group))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _weight_call(a, b, group_sizes_E, scales, *, transposed: bool, out_dtype, interpret: bool, bs: BlockSizes):
    """The weight kernels: a = x [N, C], b = dy [N, J] (transposed False) or a = xᵀ [C, N], b = dyᵀ [J, N] with
    scales (a_scale [C, Nb], b_scale [J, Nb]) for FP8 operands. Result [E, C, J].

    tgmm and tgmm_fp8 run over (C tiles, J tiles, visits): every group is visited at least once, its row tiles
    accumulate into one (bk, bn) accumulator (rows of other groups masked out), stored at the group's last visit, so
    empty groups get zeros. FP8 scales as in the row kernels."""
    if transposed:
        (C, N), J = a.shape, b.shape[0]
    else:
        (N, C), J = a.shape, b.shape[1]
    E = group_sizes_E.shape[0]
    bm = _row_block(N, bs.m)
    Np, Cp, Jp = _round_up(N, bm), _round_up(C, TILE), _round_up(J, TILE)
    bk, bn = _block(Cp, bs.k), _block(Jp, bs.n)
    n_tiles = Np // bm
    visits = _visits(group_sizes_E, N, bm, n_tiles, tail_tiles=False, empty_groups=True)
    if transposed:
        operands = [_pad2(a, Cp, Np), _pad2(b, Jp, Np)]
        in_specs = [pl.BlockSpec((bk, bm), lambda i, j, v, g, t, lo, hi: (i, t[v])),
                    pl.BlockSpec((bn, bm), lambda i, j, v, g, t, lo, hi: (j, t[v]))]
    else:
        operands = [_pad2(a, Np, Cp), _pad2(b, Np, Jp)]
        in_specs = [pl.BlockSpec((bm, bk), lambda i, j, v, g, t, lo, hi: (t[v], i)),
                    pl.BlockSpec((bm, bn), lambda i, j, v, g, t, lo, hi: (t[v], j))]
    if scales is not None:
        a_scale_CNb, b_scale_JNb = scales
        Nb, bmb = Np // TILE, bm // TILE       # bmb (1, 2, 4 or 8) divides 8 and 128: a tile's scales share a block
        # a scales [Cp, Nb → 128k]: a (bk, 128) block holds the (bk, 1) columns of 128 row blocks; b scales
        # transposed, [Nb → 8k, Jp]: an (8, bn) block holds the (1, bn) rows of 8 row blocks.
        operands += [_pad2(a_scale_CNb.astype(jnp.float32), Cp, _round_up(Nb, TILE)),
                     _pad2(b_scale_JNb.astype(jnp.float32).T, _round_up(Nb, 8), Jp)]
        in_specs += [pl.BlockSpec((bk, TILE), lambda i, j, v, g, t, lo, hi: (i, div_nonneg(t[v] * bmb, TILE))),
                     pl.BlockSpec((8, bn), lambda i, j, v, g, t, lo, hi: (div_nonneg(t[v] * bmb, 8), j))]
    kernel = functools.partial(_weight_kernel, bm=bm, scaled=scales is not None,
                               compute_dtype=jnp.promote_types(a.dtype, b.dtype))
    # From the row count: each row adds its x row ⊗ dy row to its group's dW. a is streamed once per J tile,
    # b once per C tile; FP8 adds 3 flops per output and 128-row block.
    flops = 2 * N * Cp * Jp + (3 * Cp * Jp * (Np // TILE) if scales is not None else 0)
    traffic = (nbytes(operands[0], *operands[2:3]) * (Jp // bn) + nbytes(operands[1], *operands[3:4]) * (Cp // bk)
               + E * Cp * Jp * jnp.dtype(out_dtype).itemsize)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(Cp // bk, Jp // bn, visits[0].shape[0]),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((_SQUEEZED, bk, bn), lambda i, j, v, g, t, lo, hi: (g[v], i, j)),
            scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        ),
        out_shape=out_struct((E, Cp, Jp), out_dtype, *visits, *operands),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost_estimate(flops=flops, bytes_accessed=traffic),
        interpret=interpret,
    )(*visits, *operands)
    return out[:, :C, :J]


_STATIC = ("out_dtype", "interpret", "bs")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _gmm(x_NC, w_ECJ, group_sizes_E, *, out_dtype, interpret, bs):
    return _row_call(x_NC, w_ECJ, group_sizes_E, None, rhs_nc=False, J=w_ECJ.shape[2], out_dtype=out_dtype,
                     interpret=interpret, bs=bs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _gmm_t(dy_NJ, w_ECJ, group_sizes_E, *, out_dtype, interpret, bs):
    return _row_call(dy_NJ, w_ECJ, group_sizes_E, None, rhs_nc=True, J=w_ECJ.shape[1], out_dtype=out_dtype,
                     interpret=interpret, bs=bs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _tgmm(x_NC, dy_NJ, group_sizes_E, *, out_dtype, interpret, bs):
    return _weight_call(x_NC, dy_NJ, group_sizes_E, None, transposed=False, out_dtype=out_dtype,
                        interpret=interpret, bs=bs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _gmm_fp8(a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E, *, out_dtype, interpret, bs):
    return _row_call(a_q_NC, b_q_EJC, group_sizes_E, (a_scale_NCb, b_scale_EJbCb), rhs_nc=True,
                     J=b_q_EJC.shape[1], out_dtype=out_dtype, interpret=interpret, bs=bs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _tgmm_fp8(a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E, *, out_dtype, interpret, bs):
    return _weight_call(a_q_CN, b_q_JN, group_sizes_E, (a_scale_CNb, b_scale_JNb), transposed=True,
                        out_dtype=out_dtype, interpret=interpret, bs=bs)


# The protocol's functions: shapes checked eagerly (and tgmm_fp8's 128-multiple sizes when they are concrete),
# then the jitted kernel; `block_sizes` picks the tiles (tests use 128 everywhere to exercise many tiles).

def gmm(x_NC, w_ECJ, group_sizes_E, *, out_dtype, interpret: bool = False, block_sizes: BlockSizes = BlockSizes()):
    """y[rows of g] = x[rows of g] · w[g]; float32 accumulation."""
    N, _, J, _ = reference.check_rows("gmm", x_NC, w_ECJ, group_sizes_E, contract_axis=1)
    if N == 0:
        return jnp.zeros((0, J), out_dtype)
    return _gmm(x_NC, w_ECJ, group_sizes_E, out_dtype=jnp.dtype(out_dtype), interpret=interpret, bs=block_sizes)


def gmm_t(dy_NJ, w_ECJ, group_sizes_E, *, out_dtype, interpret: bool = False, block_sizes: BlockSizes = BlockSizes()):
    """dx[rows of g] = dy[rows of g] · w[g]ᵀ; float32 accumulation."""
    N, _, C, _ = reference.check_rows("gmm_t", dy_NJ, w_ECJ, group_sizes_E, contract_axis=2)
    if N == 0:
        return jnp.zeros((0, C), out_dtype)
    return _gmm_t(dy_NJ, w_ECJ, group_sizes_E, out_dtype=jnp.dtype(out_dtype), interpret=interpret, bs=block_sizes)


def tgmm(x_NC, dy_NJ, group_sizes_E, *, out_dtype, interpret: bool = False, block_sizes: BlockSizes = BlockSizes()):
    """dw[g] = x[rows of g]ᵀ · dy[rows of g] -> [E, C, J]; zeros for empty groups; float32 accumulation."""
    N, C, J, E = reference.check_tgmm("tgmm", x_NC, dy_NJ, group_sizes_E)
    if N == 0:
        return jnp.zeros((E, C, J), out_dtype)
    return _tgmm(x_NC, dy_NJ, group_sizes_E, out_dtype=jnp.dtype(out_dtype), interpret=interpret, bs=block_sizes)


def gmm_fp8(a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E, *, out_dtype, interpret: bool = False,
            block_sizes: BlockSizes = BlockSizes()):
    """y[rows of g] = dequant(a)[rows of g] · dequant(b[g])ᵀ, a in 1×128 tiles, b [E, J, C] in 128×128 blocks."""
    N, _, J, _ = reference.check_gmm_fp8("gmm_fp8", a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E)
    if N == 0:
        return jnp.zeros((0, J), out_dtype)
    return _gmm_fp8(a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E, out_dtype=jnp.dtype(out_dtype),
                    interpret=interpret, bs=block_sizes)


def tgmm_fp8(a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E, *, out_dtype, interpret: bool = False,
             block_sizes: BlockSizes = BlockSizes()):
    """dw[g] = dequant(a)[:, rows of g] · dequant(b)[:, rows of g]ᵀ -> [E, C, J]; a, b in 1×128 tiles along N.
    Every group size must be a multiple of 128 (checked when the sizes are known at trace time)."""
    N, C, J, E = reference.check_tgmm_fp8("tgmm_fp8", a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E)
    if N == 0:
        return jnp.zeros((E, C, J), out_dtype)
    return _tgmm_fp8(a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E, out_dtype=jnp.dtype(out_dtype),
                     interpret=interpret, bs=block_sizes)
