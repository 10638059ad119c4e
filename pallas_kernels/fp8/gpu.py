"""Block-scaled FP8 matmul for Hopper as a Mosaic GPU Pallas kernel (warp-specialized, TMA-pipelined, FP8 WGMMA):
out[m, n] = Σ_kb (a_q[m, kb] · b_q[n, kb]) · a_scale[kb, m] · b_scale[kb, n] over the 128-wide C blocks kb.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8.quantize import TILE
from pallas_kernels.fp8.reference import check_operands, column_scales
from pallas_kernels.gpu_interpret import resolve_interpret

H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One CTA computes (block_m, block_n): `compute_wgs` warpgroups each own a (block_m, block_n) / compute_wgs
    slice, split along `split` ("m" or "n"); `stages` C slices are in flight; `grid_minor` and `snake_width`
    order the persistent tile loop (planar snake) for L2 reuse."""
    block_m: int = 128
    block_n: int = 128
    stages: int = 4
    compute_wgs: int = 2
    split: str = "m"
    grid_minor: str = "n"
    snake_width: int = 8
    num_sms: int = H100_SMS

    def wg_tile(self) -> tuple[int, int]:
        if self.split == "m":
            return self.block_m // self.compute_wgs, self.block_n
        return self.block_m, self.block_n // self.compute_wgs

    def check(self) -> None:
        wm, wn = self.wg_tile()
        if self.split not in ("m", "n") or self.grid_minor not in ("m", "n"):
            raise ValueError(f"TileConfig: split and grid_minor must be 'm' or 'n', got {self.split!r}, "
                             f"{self.grid_minor!r}")
        if wm % 64 or not 8 <= wn <= 256 or wn % 8:
            raise ValueError(f"TileConfig: each warpgroup's tile must be (64·i, 8..256 in steps of 8) for "
                             f"WGMMA, got {(wm, wn)} from block {self.block_m}×{self.block_n}/{self.compute_wgs} "
                             f"along {self.split}")


def default_config(T: int, J: int) -> TileConfig:
    """A starting point by shape (to be tuned on the H100): skinny T splits the warpgroups along J."""
    if T <= 64:
        return TileConfig(block_m=64, block_n=256, split="n")
    return TileConfig()


_SWIZZLE = 128   # bytes: one 128-wide FP8 C slice per row, the widest TMA/WGMMA swizzle
_FP8_TRANSFORMS = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))


def _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem, *, cfg: TileConfig, m_tiles: int, n_tiles: int,
            k_blocks: int):
    wm, wn = cfg.wg_tile()
    out_dtype = out_gmem.dtype
    minor = 0 if cfg.grid_minor == "m" else 1   # planar_snake's minor dimension

    def wg_slices(wg):
        if cfg.split == "m":
            return pl.ds(wg * wm, wm), slice(None)
        return slice(None), pl.ds(wg * wn, wn)

    def k_step(_, a_smem, b_smem, sa_smem, sb_smem, acc_TJ):
        rows, cols = wg_slices(lax.axis_index("wg"))

        def mma(partial_ref):
            plgpu.wgmma(partial_ref, a_smem.at[rows], plgpu.transpose_ref(b_smem.at[cols], (1, 0)))
            return partial_ref[...]

        partial_TJ = pl.run_scoped(mma, plgpu.ACC((wm, wn), jnp.float32))
        sa_T = sa_smem[0, rows]
        sb_J = sb_smem[0, cols]
        scale_TJ = lax.broadcast_in_dim(sa_T, (wm, wn), [0]) * lax.broadcast_in_dim(sb_J, (wm, wn), [1])
        return acc_TJ + partial_TJ * scale_TJ

    def pipeline(m_i, n_i, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            k_step,
            grid=(k_blocks,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cfg.block_m, TILE), lambda k: (m_i, k), transforms=_FP8_TRANSFORMS),
                plgpu.BlockSpec((cfg.block_n, TILE), lambda k: (n_i, k), transforms=_FP8_TRANSFORMS),
                plgpu.BlockSpec((1, cfg.block_m), lambda k: (k, m_i)),
                plgpu.BlockSpec((1, cfg.block_n), lambda k: (k, n_i)),
            ],
            wg_axis="wg",
            num_compute_wgs=cfg.compute_wgs,
            max_concurrent_steps=cfg.stages,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None   # noqa: E731  the allocations do not depend on the body

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline(0, 0, ignore).get_allocations(a_gmem, b_gmem, sa_gmem, sb_gmem),
        out_smem=plgpu.SMEM((cfg.compute_wgs, wm, wn), out_dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(loop_info):
            (tile,) = loop_info.index
            m_i, n_i = plgpu.planar_snake(tile, (m_tiles, n_tiles), minor, cfg.snake_width)

            def compute_context(run_pipeline):
                wg = lax.axis_index("wg")
                acc_TJ = run_pipeline(jnp.zeros((wm, wn), jnp.float32))
                rows, cols = wg_slices(wg)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous tile's store left out_smem
                out_smem[wg] = acc_TJ.astype(out_dtype)
                plgpu.commit_smem()
                tile_out = out_gmem.at[pl.ds(m_i * cfg.block_m, cfg.block_m), pl.ds(n_i * cfg.block_n, cfg.block_n)]
                plgpu.copy_smem_to_gmem(out_smem.at[wg], tile_out.at[rows, cols])

            pipeline(m_i, n_i, compute_context)(a_gmem, b_gmem, sa_gmem, sb_gmem, allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pad_to(x, shape):
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_matmul_nt(a_q_TC, a_scale_CbT, b_q_JC, b_scale_CbJ, out_dtype=jnp.bfloat16, config: TileConfig | None = None,
                  interpret=False):
    """The kernel on contraction-major operands: a_q [T, C], b_q [J, C] (E4M3), a_scale [Cb, T], b_scale [Cb, J]
    float32. Returns [T, J] in out_dtype.

    Layout: what FP8 WGMMA needs, both operands contraction-major (it cannot transpose 8-bit operands); a_scale
    holds 1×128 activation tiles stored block-major along C, so one TMA row per step; b_scale has one scale per
    column and C block (128×128 weight blocks expanded along J, or 128×1 tiles as they are). One CTA computes a
    (block_m, block_n) tile: a memory warpgroup streams 128-wide C slices of a, b and both scale rows through
    `stages` SMEM buffers with TMA; `compute_wgs` warpgroups each own half of the tile (split along T or J). Per C
    slice each issues a WGMMA into a fresh float32 accumulator, then promotes it:
    acc += partial · a_scale[rows] ⊗ b_scale[cols] (DeepSeek-V3's promotion every 128 elements of the contraction,
    with a separate partial accumulator, as DeepGEMM does). The epilogue casts to `out_dtype` through SMEM and
    stores with TMA. Tiles are scheduled persistently over the SMs in a snake order for L2 reuse. Unaligned T, J, C
    are zero-padded."""
    (T, C), (J, C2) = a_q_TC.shape, b_q_JC.shape
    Cb = pl.cdiv(C, TILE)
    if C2 != C:
        raise ValueError(f"fp8_matmul_nt: contraction mismatch, a is {a_q_TC.shape} and b is {b_q_JC.shape}")
    if a_scale_CbT.shape != (Cb, T) or b_scale_CbJ.shape != (Cb, J):
        raise ValueError(f"fp8_matmul_nt: scales must be a [{Cb}, {T}] and b [{Cb}, {J}], got "
                         f"{a_scale_CbT.shape} and {b_scale_CbJ.shape}")
    cfg = config or default_config(T, J)
    cfg.check()
    Tp, Jp = pl.cdiv(T, cfg.block_m) * cfg.block_m, pl.cdiv(J, cfg.block_n) * cfg.block_n
    a = _pad_to(a_q_TC, (Tp, Cb * TILE))
    b = _pad_to(b_q_JC, (Jp, Cb * TILE))
    sa = _pad_to(a_scale_CbT.astype(jnp.float32), (Cb, Tp))
    sb = _pad_to(b_scale_CbJ.astype(jnp.float32), (Cb, Jp))
    m_tiles, n_tiles = Tp // cfg.block_m, Jp // cfg.block_n
    # No cost estimate: plgpu.kernel takes none and Mosaic GPU's lowering drops one (JAX 0.10).
    kernel = plgpu.kernel(
        functools.partial(_kernel, cfg=cfg, m_tiles=m_tiles, n_tiles=n_tiles, k_blocks=Cb),
        out_type=jax.ShapeDtypeStruct((Tp, Jp), jnp.dtype(out_dtype)),
        grid=(min(cfg.num_sms, m_tiles * n_tiles),),
        grid_names=("sm",),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=resolve_interpret(interpret),
    )
    out = kernel(a, b, sa, sb)
    return out if (Tp, Jp) == (T, J) else out[:T, :J]


def fp8_matmul(a_q_TC, a_scale_TCb, b_q_CJ, b_scale, out_dtype=jnp.bfloat16, interpret=False,
               config: TileConfig | None = None):
    """`pallas_kernels.fp8.fp8_matmul`'s layout (b [C, J], scales [T, Cb] and [Cb, Jb] or [Cb, J]) on the kernel.
    Under jit the transposes fuse into the producer of the operands (the quantization)."""
    T, C, J, Cb = check_operands(a_q_TC, a_scale_TCb, b_q_CJ, b_scale)
    return fp8_matmul_nt(a_q_TC, a_scale_TCb.T, b_q_CJ.T, column_scales(b_scale, J), out_dtype=jnp.dtype(out_dtype),
                         config=config, interpret=interpret)
