"""Block-scaled FP8 GEMM: our Mosaic GPU kernel in TFLOP/s on DeepGEMM's shapes, beside XLA's BF16 and FP8 paths and,
where torch sees a CUDA GPU, cuBLAS block-scaled FP8 and torch BF16, each row checked against XLA in the same run.
Baseline: cuBLAS block-scaled FP8 where present, else XLA BF16.
"""

from __future__ import annotations

from experiments.bench import format_table

NAME = "fp8_gemm"
SUMMARY = "FP8 block-scaled GEMM TFLOP/s: our Mosaic GPU kernel vs XLA paths and cuBLAS (torch._scaled_mm)"
BASELINE = "cuBLAS block-scaled FP8 via torch._scaled_mm (XLA BF16 where torch has no GPU)"
DEVICES = 0
USES_JAX = True
DEEPGEMM_SHAPES = "4096x7168x16384,4096x4096x7168,4096x2112x7168,4096x24576x1536,128x7168x16384,64x2112x7168"


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", default=DEEPGEMM_SHAPES, help="comma-separated MxNxK (default: DeepGEMM's six)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per variant (default: %(default)s)")
    parser.add_argument("--interpret", action="store_true",
                        help="run our kernel in the GPU interpreter (CPU hosts; small shapes only)")
    parser.add_argument("--block", default="", metavar="BMxBN[:split]",
                        help="override the kernel's CTA tile, e.g. 128x128:m or 64x256:n (default: by shape)")
    parser.add_argument("--stages", type=int, default=4, help="K slices in flight (default: %(default)s)")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        raise SystemExit(f"--shapes: expected comma-separated MxNxK, got {text!r}") from None
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes: expected comma-separated MxNxK with positive sizes, got {text!r}")
    return shapes


def _config(args, M, N):
    from pallas_kernels.fp8 import gpu

    if not args.block:
        return gpu.TileConfig(**{**gpu.default_config(M, N).__dict__, "stages": args.stages})
    dims, _, split = args.block.partition(":")
    try:
        bm, bn = (int(d) for d in dims.split("x"))
    except ValueError:
        raise SystemExit(f"--block: expected BMxBN[:m|n], got {args.block!r}") from None
    config = gpu.TileConfig(block_m=bm, block_n=bn, split=split or "m", stages=args.stages)
    try:
        config.check()
    except ValueError as e:
        raise SystemExit(f"--block: {e}") from None
    return config


def _torch_rows(a_MK, b_KN, M, N, K, iters):
    """cuBLAS block-scaled FP8 and BF16 through torch, or None when torch has no CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    import numpy as np

    from experiments.bench.timing import torch_median_seconds

    a = torch.from_numpy(np.asarray(a_MK, np.float32)).cuda()
    b = torch.from_numpy(np.asarray(b_KN, np.float32)).cuda()
    rows = {}
    a16, b16 = a.bfloat16(), b.bfloat16()
    rows["torch_bf16"] = torch_median_seconds(lambda: a16 @ b16, iters=iters)
    try:
        # 1×128 activation scales (M, K/128) column-major, 128×128 weight scales, weight stored (N, K).
        Kb, Nb = K // 128, N // 128
        a_amax = a.view(M, Kb, 128).abs().amax(-1).clamp(min=1e-30)
        a_scale = (a_amax / 448.0)
        a_q = (a.view(M, Kb, 128) / a_scale[..., None]).view(M, K).to(torch.float8_e4m3fn)
        w = b.t().contiguous()                                     # (N, K)
        w_amax = w.view(Nb, 128, Kb, 128).abs().amax((1, 3)).clamp(min=1e-30)
        w_scale = w_amax / 448.0
        w_q = (w.view(Nb, 128, Kb, 128) / w_scale[:, None, :, None]).view(N, K).to(torch.float8_e4m3fn)
        a_scale_cm = a_scale.t().contiguous().t()
        rows["cublas_blockwise_fp8"] = torch_median_seconds(
            lambda: torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale_cm, scale_b=w_scale.t(),
                                     out_dtype=torch.bfloat16), iters=iters)
    except Exception as e:   # noqa: BLE001  an API mismatch in this torch is reported, not fatal
        rows["cublas_blockwise_fp8"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return rows


def measure(args, M, N, K) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench.timing import median_seconds
    from pallas_kernels.fp8 import dequantize, gpu, quantize_1x128, quantize_128x128

    flops = 2.0 * M * N * K
    ka, kb = jax.random.split(jax.random.key(M * 31 + N * 7 + K))
    a_MK = jax.random.normal(ka, (M, K), jnp.float32) * jnp.exp(jax.random.normal(kb, (M, 1)))
    b_KN = jax.random.normal(kb, (K, N), jnp.float32)
    a_q, a_s = quantize_1x128(a_MK)
    b_q, b_s = quantize_128x128(b_KN)
    # Operands as the kernel and cuBLAS want them, prepared outside the timed region.
    b_q_NK, a_s_KbM = b_q.T, a_s.T
    b_s_KbN = jnp.repeat(b_s, 128, axis=1)[:, :N]
    config = _config(args, M, N)
    ours = jax.jit(lambda *x: gpu.fp8_matmul_nt(*x, config=config, interpret=args.interpret))
    a16, b16 = a_MK.astype(jnp.bfloat16), b_KN.astype(jnp.bfloat16)
    s_a, s_b = jnp.max(jnp.abs(a_MK)) / 448, jnp.max(jnp.abs(b_KN)) / 448
    a_t8, b_t8_NK = (a_MK / s_a).astype(jnp.float8_e4m3fn), (b_KN.T / s_b).astype(jnp.float8_e4m3fn)
    variants = {
        "ours_fp8_blockwise": (ours, (a_q, a_s_KbM, b_q_NK, b_s_KbN)),
        "xla_bf16": (jax.jit(lambda x, y: x @ y), (a16, b16)),
        "xla_fp8_per_tensor_NK": (jax.jit(lambda x, y, s: (jax.lax.dot_general(
            x, y, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * s).astype(jnp.bfloat16)),
            (a_t8, b_t8_NK, s_a * s_b)),
        "xla_dequant_bf16": (jax.jit(lambda xq, xs, yq, ys: dequantize(xq, xs, (1, 128)).astype(jnp.bfloat16)
                                     @ dequantize(yq, ys, (128, 128)).astype(jnp.bfloat16)), (a_q, a_s, b_q, b_s)),
    }
    iters, warmup = args.iters, 3
    row = {"M": M, "N": N, "K": K, "tile": f"{config.block_m}x{config.block_n}:{config.split}/{config.stages}"}
    outputs = {}
    for name, (fn, operands) in variants.items():
        if args.interpret:   # a correctness run: interpreter timings mean nothing
            outputs[name] = fn(*operands)
            continue
        t = median_seconds(fn, *operands, warmup=warmup, iters=iters)
        row[name] = flops / t["median"] / 1e12
        outputs[name] = fn(*operands)
    y = np.asarray(outputs["ours_fp8_blockwise"], np.float64)
    ref = np.asarray(jnp.dot(dequantize(a_q, a_s, (1, 128)), dequantize(b_q, b_s, (128, 128)),
                             precision="highest"), np.float64)
    row["rel_err_vs_dequant_f32"] = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    exact = np.asarray(jnp.dot(a_MK, b_KN, precision="highest"), np.float64)
    row["deepgemm_diff"] = float(1 - 2 * np.sum(y * exact) / np.sum(y * y + exact * exact))
    torch_rows = None if args.interpret else _torch_rows(a_MK, b_KN, M, N, K, args.iters)
    for name, t in (torch_rows or {}).items():
        row[name] = flops / t["median"] / 1e12 if "median" in t else None
        if "error" in t:
            row[f"{name}_error"] = t["error"]
    baseline = row.get("cublas_blockwise_fp8") or row.get("xla_bf16")
    if baseline and row.get("ours_fp8_blockwise"):
        row["ratio_vs_baseline"] = row["ours_fp8_blockwise"] / baseline
    return row


def run(args) -> dict:
    """Our kernel (1×128 activation and 128×128 weight scales, promotion every 128 of K) side by side in the same
    run with XLA BF16, XLA per-tensor FP8 with the weight stored (N, K), XLA dequantize-then-BF16, and, where torch
    sees a CUDA GPU, cuBLAS block-scaled FP8 (`torch._scaled_mm`) and torch BF16. Every row checks our result
    against XLA's dequantize-then-dot of the same FP8 inputs dequantized to float32 (relative max error) and
    DeepGEMM's metric against the unquantized product.

    On a host without a Hopper GPU it runs the kernel in the GPU interpreter (`--interpret`, small shapes only): a
    correctness run of this program, not a measurement."""
    import jax

    from sharding.targets import platform_of

    shapes = parse_shapes(args.shapes)
    if not args.interpret and platform_of(jax.devices()[0]) != "hopper":
        raise SystemExit("fp8_gemm: our kernel needs a Hopper GPU (compute capability 9.x); on other hosts pass "
                         "--interpret with small --shapes (a correctness run, not a measurement)")
    rows = [measure(args, *shape) for shape in shapes]
    return {"rows": rows, "baseline": BASELINE, "units": "TFLOP/s (2·M·N·K / median seconds)",
            "interpreted": bool(args.interpret)}


def table(result) -> str:
    cols = [("M", "M", "d"), ("N", "N", "d"), ("K", "K", "d"), ("tile", "tile", "s"),
            ("ours", "ours_fp8_blockwise", ".0f"), ("cuBLAS blk", "cublas_blockwise_fp8", ".0f"),
            ("torch bf16", "torch_bf16", ".0f"), ("XLA bf16", "xla_bf16", ".0f"),
            ("XLA fp8/tensor", "xla_fp8_per_tensor_NK", ".0f"), ("XLA deq+bf16", "xla_dequant_bf16", ".0f"),
            ("ours/base", "ratio_vs_baseline", ".2f"), ("rel err", "rel_err_vs_dequant_f32", ".1e"),
            ("diff", "deepgemm_diff", ".1e")]
    return format_table(result["rows"], cols)
