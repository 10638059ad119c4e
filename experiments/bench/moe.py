"""MoE kernels on the GPU, three tables in one run:

1. grouped GEMM TFLOP/s at DeepSeek-V3 expert shapes and the `small` preset's, ours (Mosaic GPU, BF16 and FP8
   block-scaled) side by side with `jax.lax.ragged_dot`, JAX's example `ragged_dot_mgpu`, and where torch sees a
   CUDA GPU `torch._grouped_mm` (BF16) and `torch._scaled_grouped_mm` (FP8, row-wise scales);
2. dispatch (gather into expert order, optionally quantizing to FP8) and combine (weighted scatter-add) in GB/s
   against a plain device-to-device copy of the same bytes;
3. the whole MoE layer, forward and backward, with the platform's kernels against the reference path.

Every kernel row is checked against the reference on the same inputs. On hosts without a Hopper GPU,
`--interpret` runs the GPU kernels in JAX's GPU interpreter on small shapes (a correctness run, no timings).
Baselines: torch._grouped_mm (GEMM; ragged_dot where torch has no GPU), the copy (dispatch), the reference layer.
"""

from __future__ import annotations

from experiments.bench import format_table

NAME = "moe"
SUMMARY = "MoE grouped GEMM / dispatch / combine / layer: our kernels vs ragged_dot, JAX's example, torch"
BASELINE = "torch._grouped_mm (GEMM), device copy (dispatch/combine), reference path (layer)"
DEVICES = 0
USES_JAX = True
# groups × rows per group, K → N: DeepSeek-V3 experts (32 local experts at 32K tokens; 256 experts at 4K) and the
# `small` preset (64 experts, 8K tokens, top-6).
GEMM_SHAPES = "32x1024x7168x2048,32x1024x2048x7168,64x768x1024x512,256x128x7168x2048"


def add_arguments(parser) -> None:
    parser.add_argument("--gemm-shapes", default=GEMM_SHAPES, metavar="GxRxKxN,...",
                        help="grouped GEMM shapes: groups x rows per group x K x N (default: %(default)s)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="share of the rows sent to the first quarter of the groups on top of a uniform "
                             "split (0: balanced; default %(default)s)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per variant (default: %(default)s)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the GPU kernels in JAX's GPU interpreter (CPU hosts; small shapes only)")
    parser.add_argument("--sections", default="gemm", help="comma-separated: gemm (default: %(default)s)")


def parse_gemm_shapes(text: str) -> list[tuple[int, int, int, int]]:
    try:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        raise SystemExit(f"--gemm-shapes: expected comma-separated GxRxKxN, got {text!r}") from None
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--gemm-shapes: expected comma-separated GxRxKxN with positive sizes, got {text!r}")
    return shapes


def group_sizes(groups: int, rows: int, skew: float, seed: int = 0):
    """`groups` sizes summing to groups·rows: uniform, with `skew` of the rows moved to the first quarter, and a
    little noise so sizes are not block multiples (every path must handle ragged groups)."""
    import numpy as np

    total = groups * rows
    hot = max(1, groups // 4)
    weights = np.full(groups, (1.0 - skew) / groups)
    weights[:hot] += skew / hot
    rng = np.random.default_rng(seed)
    weights *= rng.uniform(0.9, 1.1, groups)
    sizes = np.floor(weights / weights.sum() * total).astype(np.int32)
    sizes[-1] += total - sizes.sum()
    return sizes


def _torch_gemm(x, w_GKN, sizes, iters):
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    import numpy as np

    from experiments.bench.timing import torch_median_seconds

    xt = torch.from_numpy(np.asarray(x, np.float32)).cuda().bfloat16()
    wt = torch.from_numpy(np.asarray(w_GKN, np.float32)).cuda().bfloat16()
    offs = torch.from_numpy(np.cumsum(sizes).astype(np.int32)).cuda()
    out = {}
    try:
        out["torch_grouped_mm_bf16"] = torch_median_seconds(lambda: torch._grouped_mm(xt, wt, offs=offs), iters=iters)
    except Exception as e:   # noqa: BLE001  reported in the row
        out["torch_grouped_mm_bf16"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    try:
        x8_scale = xt.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
        x8 = (xt.float() / x8_scale).to(torch.float8_e4m3fn)
        w_NK = wt.transpose(1, 2).contiguous()                       # (G, N, K): K-major weights
        w8_scale = w_NK.float().abs().amax(-1).clamp(min=1e-12) / 448   # (G, N) row-wise
        w8 = (w_NK.float() / w8_scale[..., None]).to(torch.float8_e4m3fn)
        out["torch_scaled_grouped_mm_fp8_rowwise"] = torch_median_seconds(
            lambda: torch._scaled_grouped_mm(x8, w8.transpose(1, 2), x8_scale.squeeze(-1), w8_scale, offs=offs,
                                             out_dtype=torch.bfloat16), iters=iters)
    except Exception as e:   # noqa: BLE001
        out["torch_scaled_grouped_mm_fp8_rowwise"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return out


def gemm_row(args, G, R, K, N) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench.timing import median_seconds
    from pallas_kernels.fp8 import quantize_1x128, quantize_128x128
    from pallas_kernels.grouped_matmul import gpu as gmm_gpu

    sizes = group_sizes(G, R, args.skew)
    M = int(sizes.sum())
    flops = 2.0 * M * K * N
    kx, kw = jax.random.split(jax.random.key(G * 7 + K))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (G, K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes)
    x_q, x_s = quantize_1x128(x)
    w_q_GNK, w_s_GNbKb = jax.vmap(lambda w_KN: quantize_128x128(w_KN.T))(w)
    interpret = args.interpret
    variants = {
        "ours_bf16": (lambda a, b, g: gmm_gpu.gmm(a, b, g, out_dtype=jnp.bfloat16, interpret=interpret), (x, w, gs)),
        "ours_fp8_blockwise": (lambda a, s, b, t, g: gmm_gpu.gmm_fp8(a, s, b, t, g, out_dtype=jnp.bfloat16,
                                                                      interpret=interpret),
                               (x_q, x_s, w_q_GNK, w_s_GNbKb, gs)),
        "xla_ragged_dot_bf16": (jax.lax.ragged_dot, (x, w, gs)),
    }
    if not interpret:
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

            variants["jax_example_ragged_dot_mgpu"] = (
                lambda a, b, g: ragged_dot_mgpu.ragged_dot(a, b, group_sizes=g, block_m=64, block_n=256, block_k=64,
                                                           max_concurrent_steps=4, grid_block_n=1), (x, w, gs))
        except ImportError as e:
            variants["jax_example_ragged_dot_mgpu"] = None
            print(f"moe: JAX's example ragged_dot_mgpu is unavailable ({e})")
    row = {"section": "gemm", "shape": f"{G}x{R} {K}->{N}", "rows": M}
    outputs = {}
    for name, spec in variants.items():
        if spec is None:
            continue
        fn, operands = spec
        fn = jax.jit(fn)
        try:
            outputs[name] = fn(*operands)
            if not interpret:
                row[name] = flops / median_seconds(fn, *operands, iters=args.iters)["median"] / 1e12
        except Exception as e:   # noqa: BLE001  one failing variant must not hide the others
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
    ref = np.asarray(jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), gs,
                                        precision="highest"), np.float64)
    for name in ("ours_bf16", "ours_fp8_blockwise"):
        if name in outputs:
            y = np.asarray(outputs[name], np.float64)
            row[f"{name}_rel_err"] = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    for name, t in ({} if interpret else _torch_gemm(x, w, sizes, args.iters)).items():
        row[name] = flops / t["median"] / 1e12 if "median" in t else None
        if "error" in t:
            row[f"{name}_error"] = t["error"]
    base = row.get("torch_grouped_mm_bf16") or row.get("xla_ragged_dot_bf16")
    for name in ("ours_bf16", "ours_fp8_blockwise"):
        if base and row.get(name):
            row[f"{name}_vs_base"] = row[name] / base
    return row


def run(args) -> dict:
    from pallas_kernels.fp8.api import is_hopper

    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - {"gemm"})
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from gemm")
    shapes = parse_gemm_shapes(args.gemm_shapes)
    if not 0.0 <= args.skew < 1.0:
        raise SystemExit(f"--skew must be in [0, 1), got {args.skew}")
    if not args.interpret and not is_hopper():
        raise SystemExit("moe: our GPU kernels need a Hopper GPU (compute capability 9.x); on other hosts pass "
                         "--interpret with small shapes (a correctness run, not a measurement)")
    rows = []
    if "gemm" in sections:
        rows += [gemm_row(args, *shape) for shape in shapes]
    return {"rows": rows, "baseline": BASELINE, "interpreted": bool(args.interpret),
            "units": {"gemm": "TFLOP/s (2·rows·K·N / median seconds)"}}


def table(result) -> str:
    gemm = [r for r in result["rows"] if r["section"] == "gemm"]
    cols = [("shape", "shape", "s"), ("ours bf16", "ours_bf16", ".0f"), ("ours fp8", "ours_fp8_blockwise", ".0f"),
            ("torch bf16", "torch_grouped_mm_bf16", ".0f"), ("torch fp8 row", "torch_scaled_grouped_mm_fp8_rowwise", ".0f"),
            ("ragged_dot", "xla_ragged_dot_bf16", ".0f"), ("jax mgpu ex.", "jax_example_ragged_dot_mgpu", ".0f"),
            ("bf16/base", "ours_bf16_vs_base", ".2f"), ("fp8/base", "ours_fp8_blockwise_vs_base", ".2f"),
            ("err bf16", "ours_bf16_rel_err", ".1e"), ("err fp8", "ours_fp8_blockwise_rel_err", ".1e")]
    return "grouped GEMM (TFLOP/s)\n" + format_table(gemm, cols)
