"""Every Pallas kernel compiled ahead of time for chips this host does not have (an H100; TPU v5e, v5p, v6e), beside
tokamax's equivalents; nothing runs (sharding.targets). Baseline: none, the numbers are the compilers'. Also the
helpers tests/aot/test_kernels_aot.py compiles with (`kernel_cases`, `compile_case`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
import tempfile
import time
from typing import Callable

from experiments.bench import format_table

NAME = "kernels_aot"
SUMMARY = "every Pallas kernel compiled for H100 (registers/spills/SMEM) and TPU v5e/v5p/v6e (compile s, flops)"
BASELINE = "none: compiler reports (ptxas, XLA's TPU cost model) for compile-only devices"
DEVICES = 0
USES_JAX = True

GPU_TARGET = "h100"
TPU_TARGETS = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")
# Tokens per device the presets' kernels see: `small` trains 8 × 2048 per device, v3-671b 4096-token micro-batches.
PRESET_TOKENS = {"tiny": 8 * 128, "small": 8 * 2048, "v3-671b": 4096}
# Their rows' sequence length: the attention cases take the tokens as tokens // seq rows of seq positions.
PRESET_SEQ = {"tiny": 128, "small": 2048, "v3-671b": 4096}
TOKAMAX_VERSION = "0.0.12"          # pyproject.toml's optional extra `tokamax`
TOKAMAX_MISSING = "tokamax is not installed"


@dataclasses.dataclass(frozen=True)
class LayerShapes:
    """The widths one MoE layer's kernels see: T tokens, each routed to `top_k` of E experts; D → F per expert;
    the dense FP8 GEMM D → I."""
    name: str
    T: int
    D: int
    F: int
    E: int
    top_k: int
    I: int
    dtype: str = "bfloat16"      # activations (the TPU cases use it; the Mosaic GPU kernels take 16-bit only)
    heads: int = 0               # MLA: query heads (0: no attention cases), q/k nope and rope head dims, v head dim,
    qk_nope: int = 0             # and the rows' sequence length
    qk_rope: int = 0
    v_head: int = 0
    seq: int = 0

    @property
    def batch(self) -> int:          # attention rows of `seq` positions in the T tokens
        return max(1, self.T // self.seq) if self.seq else 0

    @property
    def rows(self) -> int:           # rows of the grouped operand (dropless, no expert parallelism)
        return self.T * self.top_k

    @property
    def aligned_rows(self) -> int:   # the FP8 weight gradient's 128-aligned layout (grouped_matmul.layout)
        return -(-(self.rows + self.E * 127) // 128) * 128


def preset_shapes(preset: str, tokens: int | None = None) -> LayerShapes:
    from dsv3_jax.config.presets import get_preset

    c = get_preset(preset)
    T = tokens or PRESET_TOKENS.get(preset, 4096)
    return LayerShapes(preset, T, c.dim, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok,
                       c.intermediate_size, c.dtype, c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                       min(PRESET_SEQ.get(preset, 4096), T))


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One kernel call to compile: `fn(*args)` with args given as (shape, dtype) pairs; `devices` > 1 runs it in a
    mesh of that many devices along axis "x", each arg sharded by its spec (None: replicated). `flops`: the
    arithmetic the call does by its shapes (None for pure data movement), what its cost estimate should say.
    `impl`: whose kernels ("ours" or "tokamax"); `on_target`: trace with the target's first device as JAX's default
    device (tokamax picks its kernel, and checks that it is supported, by the default device)."""
    kernel: str
    backend: str                 # "mosaic_gpu", "triton", "pallas_tpu", "xla" (plain JAX) or "reference"
    shapes: str
    fn: Callable
    args: tuple
    flops: int | None = None
    specs: tuple | None = None
    devices: int = 1
    impl: str = "ours"
    on_target: bool = False


def _short(dtype) -> str:
    import jax.numpy as jnp

    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(jnp.dtype(dtype).name, jnp.dtype(dtype).name)


def _fp8_cases(fp8_matmul, backend: str, s: LayerShapes) -> list[KernelCase]:
    """The dense FP8 GEMM (pallas_kernels.fp8 layout) up (dim → intermediate) and down (K = intermediate)."""
    import jax.numpy as jnp
    from jax.experimental.pallas import cdiv

    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    T, D, I = s.T, s.D, s.I
    return [KernelCase("fp8_matmul", backend, f"{T}x{K}->{N}", lambda a, sa, b, sb: fp8_matmul(a, sa, b, sb),
                       (((T, K), f8), ((T, cdiv(K, 128)), f32), ((K, N), f8), ((cdiv(K, 128), cdiv(N, 128)), f32)),
                       flops=2 * T * K * N)
            for K, N in ((D, I), (I, D))]


def _grouped_cases(module, backend: str, s: LayerShapes, dtype) -> list[KernelCase]:
    """The five grouped-matmul protocol functions of `module` for the layer's up projection (dim → F per expert)."""
    import jax.numpy as jnp
    from jax.experimental.pallas import cdiv

    f8, f32, i32 = jnp.float8_e4m3fn, jnp.float32, jnp.int32
    M, P, D, F, E = s.rows, s.aligned_rows, s.D, s.F, s.E
    Db, Fb, Pb = cdiv(D, 128), cdiv(F, 128), cdiv(P, 128)
    t = _short(dtype)
    return [
        KernelCase("gmm", backend, f"{M}x{D}->{E}x{F} {t}", lambda x, w, g: module.gmm(x, w, g, out_dtype=dtype),
                   (((M, D), dtype), ((E, D, F), dtype), ((E,), i32)), flops=2 * M * D * F),
        KernelCase("gmm_t", backend, f"{M}x{F}->{E}x{D} {t}", lambda dy, w, g: module.gmm_t(dy, w, g, out_dtype=dtype),
                   (((M, F), dtype), ((E, D, F), dtype), ((E,), i32)), flops=2 * M * D * F),
        KernelCase("tgmm", backend, f"{M}: {D}x{F}x{E} {t}", lambda x, dy, g: module.tgmm(x, dy, g, out_dtype=f32),
                   (((M, D), dtype), ((M, F), dtype), ((E,), i32)), flops=2 * M * D * F),
        KernelCase("gmm_fp8", backend, f"{M}x{D}->{E}x{F}",
                   lambda a, sa, b, sb, g: module.gmm_fp8(a, sa, b, sb, g, out_dtype=jnp.bfloat16),
                   (((M, D), f8), ((M, Db), f32), ((E, F, D), f8), ((E, Fb, Db), f32), ((E,), i32)),
                   flops=2 * M * D * F),
        KernelCase("tgmm_fp8", backend, f"{P}: {D}x{F}x{E}",
                   lambda a, sa, b, sb, g: module.tgmm_fp8(a, sa, b, sb, g, out_dtype=f32),
                   (((D, P), f8), ((D, Pb), f32), ((F, P), f8), ((F, Pb), f32), ((E,), i32)), flops=2 * P * D * F),
    ]


def _dispatch_cases(module, backend: str, s: LayerShapes, dtype) -> list[KernelCase]:
    import jax.numpy as jnp

    f32, i32 = jnp.float32, jnp.int32
    N, T, D, k = s.rows, s.T, s.D, s.top_k
    t = _short(dtype)
    return [
        KernelCase("gather_rows", backend, f"{T}x{D}->{N} {t}", lambda x, src: module.gather_rows(x, src)[0],
                   (((T, D), dtype), ((N,), i32))),
        KernelCase("gather_rows_fp8", backend, f"{T}x{D}->{N} {t}",
                   lambda x, src: module.gather_rows(x, src, quantize=True), (((T, D), dtype), ((N,), i32))),
        KernelCase("combine_rows", backend, f"{N}x{D}->{T} {t}",
                   lambda y, row, w: module.combine_rows(y, row, w, dtype),
                   (((N, D), dtype), ((T, k), i32), ((T, k), f32)), flops=2 * T * k * D),
        KernelCase("combine_rows_grad", backend, f"{N}x{D}<-{T} {t}",
                   lambda y, dout, src, w: module.combine_rows_grad(y, dout, src, w),
                   (((N, D), dtype), ((T, D), dtype), ((N,), i32), ((N,), f32)), flops=3 * N * D),
    ]


def _all_to_all_case(s: LayerShapes, devices: int = 4) -> KernelCase:
    """The expert-parallel exchange: each device sends an equal share of its dispatched rows to every peer."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import cdiv
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.all_to_all import all_to_all

    block = cdiv(s.rows, devices * devices)

    def exchange(x_NNRD):
        return jax.shard_map(lambda x: all_to_all(x[0], "x", 0, 0)[None], in_specs=P("x"), out_specs=P("x"))(x_NNRD)

    return KernelCase("all_to_all", "pallas_tpu", f"{devices}x{devices}x{block}x{s.D} {_short(s.dtype)}", exchange,
                      (((devices, devices, block, s.D), jnp.dtype(s.dtype)),), specs=(P("x"),), devices=devices)


def kernel_cases(platform: str, shapes: LayerShapes) -> list[KernelCase]:
    """Every Pallas kernel of `platform` at `shapes`: "gpu" the Mosaic GPU (FP8 GEMM, grouped matmuls; 16-bit
    activations) and Pallas-Triton (dispatch/combine) kernels, "tpu" the Pallas TPU kernels (the preset's dtype)."""
    import jax.numpy as jnp

    if platform == "gpu":
        from pallas_kernels.dispatch import gpu as dispatch_kernels
        from pallas_kernels.fp8 import gpu as fp8_kernels
        from pallas_kernels.grouped_matmul import gpu as gmm_kernels
        dtype = jnp.dtype(shapes.dtype) if jnp.dtype(shapes.dtype).itemsize == 2 else jnp.dtype(jnp.bfloat16)
        return (_fp8_cases(fp8_kernels.fp8_matmul, "mosaic_gpu", shapes)
                + _grouped_cases(gmm_kernels, "mosaic_gpu", shapes, dtype)
                + _dispatch_cases(dispatch_kernels, "triton", shapes, dtype))
    from pallas_kernels.dispatch import tpu as dispatch_kernels
    from pallas_kernels.fp8 import tpu as fp8_kernels
    from pallas_kernels.grouped_matmul import tpu as gmm_kernels
    dtype = jnp.dtype(shapes.dtype)
    return (_fp8_cases(fp8_kernels.fp8_matmul, "pallas_tpu", shapes)
            + _grouped_cases(gmm_kernels, "pallas_tpu", shapes, dtype)
            + _dispatch_cases(dispatch_kernels, "pallas_tpu", shapes, dtype) + [_all_to_all_case(shapes)])


def reference_cases(shapes: LayerShapes) -> list[KernelCase]:
    """The jnp references the kernels fall back to (and non-Hopper GPUs run): the FP8 GEMM and the grouped
    matmuls, in bfloat16 (the training dtype; the preset's where it is 32-bit too)."""
    import jax.numpy as jnp

    from pallas_kernels.fp8 import reference as fp8_reference
    from pallas_kernels.grouped_matmul import reference as gmm_reference

    cases = _fp8_cases(fp8_reference.fp8_matmul, "reference", shapes)
    for dtype in dict.fromkeys([jnp.dtype(jnp.bfloat16), jnp.dtype(shapes.dtype)]):
        cases += [c for c in _grouped_cases(gmm_reference, "reference", shapes, dtype)
                  if dtype == jnp.bfloat16 or not c.kernel.endswith("fp8")]
    return cases


# ---- beside ours: the differentiable grouped matmul, MLA attention, and tokamax's kernels for the same products ----

def import_tokamax():
    """tokamax, imported on first use; ModuleNotFoundError naming the extra where it is absent. tokamax reads its
    absl flags on first use and would parse sys.argv for them (a benchmark's own options, which absl rejects): they
    are marked parsed, at their defaults, first."""
    try:
        import tokamax
    except ImportError as e:
        raise ModuleNotFoundError(f"{TOKAMAX_MISSING} ({e}); pip install 'dsv3-jax[tokamax]' "
                                  f"(tokamax=={TOKAMAX_VERSION})") from None
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


@contextlib.contextmanager
def _quiet_absl():
    """tokamax warns on every call that its autotuning cache has no entry (it then takes its heuristic config)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def with_tokamax(body: Callable) -> Callable:
    """fn(*args) = body(tokamax, *args), tokamax imported (or the not-installed error raised) at trace time."""
    return lambda *args: body(import_tokamax(), *args)


def _ragged_dims(contract: tuple, rhs_group: tuple):
    """jax.lax.RaggedDotDimensionNumbers with lhs rows ragged: tokamax's dlhs (contract ([1], [2]), group [0]) and
    drhs (contract ([0], [0]), no group: a ragged contraction whose output has a group axis) forms."""
    import jax

    return jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(contract, ([], [])), lhs_ragged_dimensions=[0],
                                            rhs_group_dimensions=list(rhs_group))


def _vjp_of(fn: Callable, n_diff: int) -> Callable:
    """(out, grads of the first n_diff args) of fn for a cotangent passed as the last argument."""
    import jax

    def forward_backward(*args):
        diff, rest, dout = args[:n_diff], args[n_diff:-1], args[-1]
        out, vjp = jax.vjp(lambda *d: fn(*d, *rest), *diff)
        return out, vjp(dout)
    return forward_backward


def _grouped_fwd_bwd_case(platform: str, s: LayerShapes, dtype) -> KernelCase:
    """Ours: grouped_matmul's forward and custom VJP (gmm; gmm_t and tgmm) in one program."""
    import jax.numpy as jnp

    from pallas_kernels.grouped_matmul import grouped_matmul

    M, D, F, E = s.rows, s.D, s.F, s.E
    impl = "gpu" if platform == "gpu" else "tpu"
    backend = "mosaic_gpu" if platform == "gpu" else "pallas_tpu"
    return KernelCase("gmm_fwd_bwd", backend, f"{M}x{D}->{E}x{F} {_short(dtype)}",
                      _vjp_of(lambda x, w, g: grouped_matmul(x, w, g, impl=impl), 2),
                      (((M, D), dtype), ((E, D, F), dtype), ((E,), jnp.int32), ((M, F), dtype)),
                      flops=3 * 2 * M * D * F)


def tokamax_grouped_cases(platform: str, s: LayerShapes, dtype) -> list[KernelCase]:
    """tokamax's ragged_dot on its Mosaic GPU (H100) or Mosaic TPU kernels for _grouped_cases' products: gmm
    (ragged_dot), gmm_t (ragged_dot_general contracting W's last axis: its dlhs form, for which the GPU kernel has W
    transposed by XLA first), tgmm (the ragged contraction: its drhs form), gmm_fp8 (our FP8 operands as qwix
    QArrays: x in 1×128 tiles, W[g] in (E, D, F) with its 128×128 block scales repeated per column, since tokamax
    takes (1, k, 1) weight scale tiles only), and ragged_dot's forward + backward (its own VJP: dlhs, drhs)."""
    import jax.numpy as jnp
    from jax.experimental.pallas import cdiv

    f8, f32, i32 = jnp.float8_e4m3fn, jnp.float32, jnp.int32
    M, D, F, E = s.rows, s.D, s.F, s.E
    Db, Fb = cdiv(D, 128), cdiv(F, 128)
    t = _short(dtype)
    impl = "mosaic_gpu" if platform == "gpu" else "mosaic_tpu"
    backend = "mosaic_gpu" if platform == "gpu" else "pallas_tpu"
    dlhs, drhs = _ragged_dims(([1], [2]), [0]), _ragged_dims(([0], [0]), [])

    def gmm(tk, x, w, g):
        return tk.ragged_dot(x, w, g, preferred_element_type=dtype, implementation=impl)

    def gmm_fp8(tk, a, sa, b_EFD, sb_EFbDb, g):
        import qwix

        w_q_EDF = jnp.swapaxes(b_EFD, 1, 2)
        w_s_EDbF = jnp.swapaxes(jnp.repeat(sb_EFbDb, 128, axis=1)[:, :F], 1, 2)
        return tk.ragged_dot(qwix.QArray(a, sa, qtype=f8), qwix.QArray(w_q_EDF, w_s_EDbF, qtype=f8), g,
                             preferred_element_type=jnp.bfloat16, implementation=impl)

    def case(kernel, shapes, body, args, flops):
        return KernelCase(kernel, backend, shapes, with_tokamax(body), args, flops=flops, impl="tokamax",
                          on_target=True)

    flops = 2 * M * D * F
    return [
        case("gmm", f"{M}x{D}->{E}x{F} {t}", gmm, (((M, D), dtype), ((E, D, F), dtype), ((E,), i32)), flops),
        case("gmm_t", f"{M}x{F}->{E}x{D} {t}",
             lambda tk, dy, w, g: tk.ragged_dot_general(dy, w, g, dlhs, preferred_element_type=dtype,
                                                        implementation=impl),
             (((M, F), dtype), ((E, D, F), dtype), ((E,), i32)), flops),
        case("tgmm", f"{M}: {D}x{F}x{E} {t}",
             lambda tk, x, dy, g: tk.ragged_dot_general(x, dy, g, drhs, preferred_element_type=f32,
                                                        implementation=impl),
             (((M, D), dtype), ((M, F), dtype), ((E,), i32)), flops),
        case("gmm_fp8", f"{M}x{D}->{E}x{F} w (1,128,1)", gmm_fp8,
             (((M, D), f8), ((M, Db), f32), ((E, F, D), f8), ((E, Fb, Db), f32), ((E,), i32)), flops),
        case("gmm_fwd_bwd", f"{M}x{D}->{E}x{F} {t}",
             lambda tk, x, w, g, dy: _vjp_of(lambda x, w, g: gmm(tk, x, w, g), 2)(x, w, g, dy),
             (((M, D), dtype), ((E, D, F), dtype), ((E,), i32), ((M, F), dtype)), 3 * flops),
    ]


def _mla_qkv(q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA):
    """q, k as [nope ; rope] per head with the one rope key head broadcast to every head (attention_core's fused
    paths do the same), v as it is."""
    import jax.numpy as jnp

    H, R = q_nope_BTHU.shape[2], k_rope_BSR.shape[-1]
    k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], (*k_rope_BSR.shape[:2], H, R))
    return (jnp.concatenate([q_nope_BTHU, q_rope_BTHR], axis=-1), jnp.concatenate([k_nope_BSHU, k_rope_BSHR], axis=-1),
            v_BSHA)


def _document_starts(segment_ids_BT):
    """(B, T) the first position of each position's document: packed documents are contiguous, so causal and
    same-document is keys [start, query]."""
    import jax
    import jax.numpy as jnp

    B, T = segment_ids_BT.shape
    first = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(first, jnp.arange(T), 0), axis=1)


def attention_cases(platform: str, s: LayerShapes) -> list[KernelCase]:
    """MLA's causal attention with packed documents, forward and forward + backward (q, k, v gradients), ours and
    tokamax's. Ours: attention_core as `auto` picks it for JAX 0.10 (blockwise: plain JAX, on GPUs; JAX's Pallas
    splash kernel on TPUs), taking the segment ids. tokamax: dot_product_attention with the documents as a boolean
    (B, 1, T, S) mask beside is_causal (its public API; no segment ids argument); on the H100 also its Mosaic GPU op
    with a Mask of k_start = each query's document start (tokamax._src: private), on TPUs causal without documents
    (its TPU path takes one unbatched boolean mask, no k_start)."""
    import jax.numpy as jnp

    from dsv3_jax.model.layers.attention_core import attention_core

    if not s.heads:
        return []
    B, T, H, U, R, A = s.batch, s.seq, s.heads, s.qk_nope, s.qk_rope, s.v_head
    dtype = jnp.dtype(s.dtype)
    if platform == "gpu" and dtype.itemsize != 2:
        dtype = jnp.dtype(jnp.bfloat16)   # the fused GPU kernels take 16-bit inputs
    scale = (U + R) ** -0.5
    impl = "mosaic_gpu" if platform == "gpu" else "mosaic_tpu"
    args = (((B, T, H, U), dtype), ((B, T, H, R), dtype), ((B, T, H, U), dtype), ((B, T, R), dtype),
            ((B, T, H, A), dtype), ((B, T), jnp.int32))
    shapes = f"{B}x{T} h{H} qk{U + R} v{A} {_short(dtype)}"
    fwd_flops = B * H * T * T * (U + R + A)            # causal: half of 2·T² per product, q·k and p·v
    bwd_flops = B * H * T * T * (4 * (U + R) + 3 * A)  # + q·k again, dv, dp, dq, dk

    ours = "blockwise" if platform == "gpu" else "splash"
    ours_fn = lambda q_n, q_r, k_n, k_r, v, seg: attention_core(ours, q_n, q_r, k_n, k_r, v, scale, seg)

    def segment_mask(tk, q_n, q_r, k_n, k_r, v, seg):
        q, k, v = _mla_qkv(q_n, q_r, k_n, k_r, v)
        mask = seg[:, None, :, None] == seg[:, None, None, :]
        return tk.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale, implementation=impl)

    def k_start(tk, q_n, q_r, k_n, k_r, v, seg):
        from tokamax._src.ops.attention import api, base

        q, k, v = _mla_qkv(q_n, q_r, k_n, k_r, v)
        mask = base.Mask(k_start=_document_starts(seg)[:, None, :], is_causal=True)
        return api.IMPLEMENTATIONS[impl](q, k, v, mask=mask, logits_scale=scale)

    def causal(tk, q_n, q_r, k_n, k_r, v, seg):
        q, k, v = _mla_qkv(q_n, q_r, k_n, k_r, v)
        return tk.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation=impl)

    tk_backend = "mosaic_gpu" if platform == "gpu" else "pallas_tpu"
    other, other_fn = ("k_start", k_start) if platform == "gpu" else ("causal only", causal)
    variants = [("ours", "xla" if platform == "gpu" else "pallas_tpu", f"{ours}, segment ids", ours_fn),
                ("tokamax", tk_backend, "segment mask", with_tokamax(segment_mask)),
                ("tokamax", tk_backend, other, with_tokamax(other_fn))]
    cases = []
    for who, backend, variant, fn in variants:
        on_target = who == "tokamax"
        cases += [KernelCase("mla_attention", backend, f"{shapes} {variant}", fn, args, flops=fwd_flops, impl=who,
                             on_target=on_target),
                  KernelCase("mla_attention_fwd_bwd", backend, f"{shapes} {variant}", _vjp_of(fn, 5),
                             args + (((B, T, H, A), dtype),), flops=fwd_flops + bwd_flops, impl=who,
                             on_target=on_target)]
    return cases


def comparison_cases(platform: str, shapes: LayerShapes, tokamax: bool = True) -> list[KernelCase]:
    """The cases beside kernel_cases: ours differentiable (grouped matmul forward + backward, MLA attention) and,
    with `tokamax`, tokamax's kernels for the same products (rows that say so where tokamax is not installed)."""
    import jax.numpy as jnp

    dtype = jnp.dtype(shapes.dtype)
    if platform == "gpu" and dtype.itemsize != 2:
        dtype = jnp.dtype(jnp.bfloat16)
    cases = [_grouped_fwd_bwd_case(platform, shapes, dtype)]
    if tokamax:
        cases += tokamax_grouped_cases(platform, shapes, dtype)
    return cases + [c for c in attention_cases(platform, shapes) if tokamax or c.impl != "tokamax"]


# ---- compiling for a compile-only target ----

@dataclasses.dataclass
class Compiled:
    ok: bool
    seconds: float
    error: str | None = None
    cost_flops: float | None = None       # XLA's cost analysis of the whole program (TPU)
    registers: int | None = None          # ptxas: registers per thread at launch (Mosaic GPU)
    spill_bytes: int | None = None        # ptxas: spill stores + loads
    smem_bytes: int | None = None         # the launch's dynamic shared memory (Mosaic GPU)
    setmaxnreg: str | None = None         # registers the consumer / producer warpgroups take at run time
    ptxas_reports: int = 0                # how many ptxas reports were read


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_LAUNCH_SMEM = re.compile(r"dynamic_shared_memory_size %c(\d+)_i32")
_SETMAXNREG = re.compile(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+);")


def ptxas_summary(texts: list[str]) -> dict:
    """registers (max), spill_bytes (sum of stores and loads) over ptxas -v reports; None where none matched."""
    regs = [int(r) for t in texts for r in _PTXAS_REGISTERS.findall(t)]
    spills = [int(a) + int(b) for t in texts for a, b in _PTXAS_SPILLS.findall(t)]
    return {"registers": max(regs) if regs else None, "spill_bytes": sum(spills) if spills else None}


def _launch_smem(path: str) -> int | None:
    """The dynamic shared memory of a Mosaic GPU launch, from its MLIR pass dump (the first constant size)."""
    with open(path, errors="replace") as f:
        for line in f:
            m = _LAUNCH_SMEM.search(line)
            if m:
                return int(m.group(1))
    return None


def _sharded_args(case: KernelCase, target: str):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from sharding import targets

    devices = targets.devices(target)
    if len(devices) < case.devices:
        raise ValueError(f"{case.kernel} needs {case.devices} devices, target {target} has {len(devices)}")
    mesh = Mesh(devices[:case.devices], ("x",))
    specs = case.specs or (None,) * len(case.args)
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec or P()))
            for (shape, dtype), spec in zip(case.args, specs)]
    return mesh, args


def lower_for(target: str, fn: Callable, case: KernelCase):
    """jit(fn) lowered for `target`'s compile-only devices with case's argument shapes."""
    import jax

    mesh, args = _sharded_args(case, target)
    on_target = case.on_target
    with jax.set_mesh(mesh), (jax.default_device(mesh.devices.flat[0]) if on_target else contextlib.nullcontext()), \
            (_quiet_absl() if on_target else contextlib.nullcontext()):
        return jax.jit(fn).lower(*args)


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Mosaic / ptxas errors put the reason on a later line than the traceback header; keep the telling one.
    telling = [ln for ln in lines if re.search(r"error|must|not |unsupported|exceed|fail", ln, re.I)]
    return (telling[0] if telling else lines[0])[:300]


_KERNEL_HASH = re.compile(r'kernel_hash = "((?:[^"\\]|\\.)*)"')
# Mosaic GPU compiles a kernel once per process (keyed by its hash), so a later program with the same kernel
# produces no new report: the first one's is kept here.
_GPU_REPORTS: dict[str, dict] = {}


def _read_dumps(directory: str) -> dict:
    reports = []
    for path in sorted(glob.glob(os.path.join(directory, "*.ptxas"))):
        with open(path, errors="replace") as f:
            reports.append(f.read())
    summary = ptxas_summary(reports)
    smem = [s for s in map(_launch_smem, glob.glob(os.path.join(directory, "*.mlir-passes.log"))) if s is not None]
    setmaxnreg = {}
    for path in glob.glob(os.path.join(directory, "*.ptx")):
        with open(path, errors="replace") as f:
            for kind, n in _SETMAXNREG.findall(f.read()):
                setmaxnreg.setdefault(kind, int(n))
    split = f"{setmaxnreg['inc']}/{setmaxnreg['dec']}" if len(setmaxnreg) == 2 else None
    return dict(summary, smem_bytes=max(smem) if smem else None, setmaxnreg=split, ptxas_reports=len(reports))


def compile_case(case: KernelCase, target: str) -> Compiled:
    """Compile `case` for `target`; on an H100 Mosaic GPU kernel also read ptxas's report and the launch's SMEM.

    Mosaic GPU writes ptxas's -v report and its pass dumps into MOSAIC_GPU_DUMP_TO (read at every compile), so each
    compile gets a fresh directory; the Triton kernels go through XLA's own ptxas, whose report is not kept.
    """
    dump = case.backend == "mosaic_gpu"
    saved = {k: os.environ.get(k) for k in ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTXAS")}
    with tempfile.TemporaryDirectory(prefix="mosaic_dump_") as tmp:
        if dump:
            os.environ.update(MOSAIC_GPU_DUMP_TO=tmp, MOSAIC_GPU_DUMP_PTXAS="1")
        start = time.perf_counter()
        try:
            lowered = lower_for(target, case.fn, case)
            hashes = _KERNEL_HASH.findall(lowered.as_text()) if dump else []
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - a compile error is a result here
            return Compiled(ok=False, seconds=time.perf_counter() - start, error=_one_line(e))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        result = Compiled(ok=True, seconds=time.perf_counter() - start)
        if target != GPU_TARGET:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            result.cost_flops = (cost or {}).get("flops")
        if dump:
            fresh = _read_dumps(tmp)
            cached = list({id(r): r for h in hashes if (r := _GPU_REPORTS.get(h)) is not None}.values())
            if fresh["ptxas_reports"]:
                _GPU_REPORTS.update({h: fresh for h in hashes if h not in _GPU_REPORTS})
            report = merge_reports(([fresh] if fresh["ptxas_reports"] else []) + cached) if cached else fresh
            for key, value in report.items():
                setattr(result, key, value)
    return result


def merge_reports(reports: list[dict]) -> dict:
    """One program's Mosaic GPU figures from the reports of its kernels (this compile's and those compiled before in
    the process): the most registers and shared memory, spill bytes and report counts summed."""
    known = lambda key: [r[key] for r in reports if r[key] is not None]
    spills = known("spill_bytes")
    return {"registers": max(known("registers"), default=None), "spill_bytes": sum(spills) if spills else None,
            "smem_bytes": max(known("smem_bytes"), default=None), "setmaxnreg": next(iter(known("setmaxnreg")), None),
            "ptxas_reports": sum(r["ptxas_reports"] for r in reports)}


# ---- the benchmark ----

def add_arguments(parser) -> None:
    parser.add_argument("--presets", default="small,v3-671b", help="comma-separated presets (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=0,
                        help="tokens per device (default: small 16384, v3-671b 4096, tiny 1024)")
    parser.add_argument("--platforms", default="gpu,tpu", help="gpu, tpu or both (default: %(default)s)")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names to keep (default: all)")
    parser.add_argument("--no-references", dest="references", action="store_false",
                        help="skip compiling the jnp references (FP8 GEMM, grouped matmuls) for each target")
    parser.add_argument("--no-tokamax", dest="tokamax", action="store_false",
                        help=f"skip the tokamax rows (ragged_dot, dot_product_attention; tokamax=={TOKAMAX_VERSION}, "
                             f"the optional extra `tokamax`)")


def _row(preset: str, target: str, case: KernelCase, r: Compiled) -> dict:
    return {"preset": preset, "target": target, "kernel": case.kernel, "impl": case.impl, "backend": case.backend,
            "shapes": case.shapes, "nominal_flops": case.flops, **dataclasses.asdict(r)}


def _beside(cases: list[KernelCase]) -> list[KernelCase]:
    """Cases grouped by kernel name in the order names first appear: tokamax's and the reference after ours."""
    order = {}
    for case in cases:
        order.setdefault(case.kernel, len(order))
    return sorted(cases, key=lambda c: order[c.kernel])


def run(args) -> dict:
    """The Mosaic GPU and Pallas-Triton kernels compiled for an H100 (ptxas's registers, spill bytes and the launch's
    shared memory per Mosaic GPU kernel), the Pallas TPU kernels for TPU v5e, v5p and v6e (compile seconds and the
    flops XLA's cost model sees, which come from the kernels' cost estimates). Shapes are a preset's MoE layer
    (`--presets`, default small and v3-671b): tokens per device × top-k rows into n_routed_experts groups of dim →
    moe_intermediate_size, the dense FP8 GEMM dim → intermediate_size and back. A compile error is a row with its
    one-line message, not a crash.

    Beside ours (column `impl`): the grouped matmul forward + backward through its custom VJP and MLA's attention
    core (causal, packed documents; forward and forward + backward at the preset's heads and head dims,
    `PRESET_SEQ`-token rows) as the model runs them, and the same products in tokamax (the optional extra
    `tokamax`): ragged_dot on its Mosaic GPU / Mosaic TPU kernels (BF16, and our FP8 operands as qwix QArrays) and
    dot_product_attention on its Mosaic GPU / Mosaic TPU flash attention. Without tokamax those rows say it is not
    installed (`--no-tokamax` drops them)."""
    # Read when JAX first initialises its backends (the CUDA plugin must not look for a driver; libtpu must load).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from sharding import targets

    platforms = [p for p in args.platforms.split(",") if p]
    if not platforms or not set(platforms) <= {"gpu", "tpu"}:
        raise SystemExit(f"--platforms: expected gpu and/or tpu, got {args.platforms!r}")
    keep = {k for k in args.kernels.split(",") if k}
    rows = []
    for preset in (p for p in args.presets.split(",") if p):
        try:
            shapes = preset_shapes(preset, args.tokens or None)
        except Exception as e:  # noqa: BLE001 - an unknown preset is a one-line exit
            raise SystemExit(str(e)) from None
        for platform in platforms:
            for target in [GPU_TARGET] if platform == "gpu" else list(TPU_TARGETS):
                try:
                    targets.devices(target)
                except targets.TargetError as e:
                    raise SystemExit(str(e)) from None
                cases = _beside(kernel_cases(platform, shapes)
                                + comparison_cases(platform, shapes, tokamax=getattr(args, "tokamax", True))
                                + (reference_cases(shapes) if args.references else []))
                rows += [_row(preset, target, case, compile_case(case, target))
                         for case in cases if not keep or case.kernel in keep]
    return {"rows": rows, "baseline": BASELINE,
            "units": "seconds to lower + compile; GFLOP from XLA's cost analysis of the program (TPU) and by shape "
                     "(nominal); registers per thread at launch and consumer/producer after setmaxnreg; SMEM per CTA"}


def _absent(row: dict) -> bool:
    return not row["ok"] and TOKAMAX_MISSING in (row.get("error") or "")


def table(result) -> str:
    cols = [("preset", "preset", "s"), ("target", "target", "s"), ("kernel", "kernel", "s"),
            ("impl", lambda r: r.get("impl", "ours"), "s"), ("backend", "backend", "s"), ("shapes", "shapes", "s"),
            ("ok", lambda r: "ok" if r["ok"] else ("absent" if _absent(r) else "ERROR"), "s"),
            ("compile s", "seconds", ".1f"),
            ("GFLOP cost", lambda r: r["cost_flops"] / 1e9 if r.get("cost_flops") is not None else None, ".4g"),
            ("GFLOP nominal", lambda r: r["nominal_flops"] / 1e9 if r.get("nominal_flops") else None, ".4g"),
            ("regs", "registers", "d"), ("setmaxnreg", "setmaxnreg", "s"), ("spill B", "spill_bytes", "d"),
            ("SMEM KiB", lambda r: r["smem_bytes"] / 1024 if r.get("smem_bytes") else None, ".1f")]
    text = format_table(result["rows"], cols)
    who = lambda r: r["backend"] if r.get("impl", "ours") == "ours" else f"{r['impl']} {r['backend']}"
    errors = [f"{r['preset']} {r['target']} {r['kernel']} ({who(r)}): {r['error']}"
              for r in result["rows"] if not r["ok"] and not _absent(r)]
    absent = [r for r in result["rows"] if _absent(r)]
    notes = f"\n\nnot compiled ({len(absent)} tokamax rows, 'absent'): {absent[0]['error']}" if absent else ""
    return text + ("\n\nerrors:\n" + "\n".join(errors) if errors else "") + notes
