"""MoE kernels on the GPU, three tables in one run: grouped GEMM TFLOP/s, dispatch/combine GB/s, and the whole MoE
layer, each row checked against the reference on the same inputs. Baselines: torch._grouped_mm (GEMM; ragged_dot
where torch has no GPU), a plain device-to-device copy (dispatch), the reference layer.
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
# tokens × dim × top-k × experts: DeepSeek-V3 (16K tokens) and the `small` preset (batch 8 × 2048)
DISPATCH_SHAPES = "16384x7168x8x256,16384x1024x6x64"
SECTIONS = ("gemm", "dispatch", "layer")
TOKAMAX_IMPLEMENTATION = "mosaic_gpu"   # tokamax's ragged_dot kernel timed here (its Hopper Mosaic GPU kernel)
FWD_BWD = ("ours_bf16_fwd_bwd", "tokamax_bf16_fwd_bwd")   # variants timed as forward + backward: 3 GEMMs each


def add_arguments(parser) -> None:
    parser.add_argument("--gemm-shapes", default=GEMM_SHAPES, metavar="GxRxKxN,...",
                        help="grouped GEMM shapes: groups x rows per group x K x N (default: %(default)s)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="share of the rows sent to the first quarter of the groups on top of a uniform "
                             "split (0: balanced; default %(default)s)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per variant (default: %(default)s)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the GPU kernels in JAX's GPU interpreter (CPU hosts; small shapes only)")
    parser.add_argument("--dispatch-shapes", default=DISPATCH_SHAPES, metavar="TxDxKxE,...",
                        help="dispatch/combine shapes: tokens x dim x top-k x experts (default: %(default)s)")
    parser.add_argument("--layer-config", default="small", help="model preset of the MoE layer row (default: %(default)s)")
    parser.add_argument("--layer-tokens", type=int, default=16384, help="tokens through the layer (default: %(default)s)")
    parser.add_argument("--sections", default="gemm,dispatch,layer",
                        help="comma-separated subset of gemm,dispatch,layer (default: %(default)s)")


def parse_shapes(flag: str, form: str, text: str) -> list[tuple[int, ...]]:
    """Comma-separated AxBx... with len(form) positive sizes, else SystemExit naming `flag`."""
    try:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != len(form) or min(s) < 1 for s in shapes):
        raise SystemExit(f"{flag}: expected comma-separated {'x'.join(form)} with positive sizes, got {text!r}")
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


def tokamax_gemm_variants(implementation: str = TOKAMAX_IMPLEMENTATION):
    """tokamax's BF16 ragged_dot on `implementation`: ({name: fn}, None), the forward (a, b, g) and the forward +
    backward (a, b, g, dy) -> (y, (da, db)); or ({}, the reason) where tokamax is not installed. Imported here, not
    at module import, so the benchmark runs without it."""
    import jax
    import jax.numpy as jnp

    from experiments.bench.kernels_aot import import_tokamax

    try:
        tokamax = import_tokamax()
    except ImportError as e:
        return {}, str(e)

    def forward(a, b, g):
        return tokamax.ragged_dot(a, b, g, preferred_element_type=jnp.bfloat16, implementation=implementation)

    def forward_backward(a, b, g, dy):
        y, vjp = jax.vjp(lambda a, b: forward(a, b, g), a, b)
        return y, vjp(dy)

    return {"tokamax_ragged_dot_bf16": forward, "tokamax_bf16_fwd_bwd": forward_backward}, None


def _ours_fwd_bwd(interpret):
    import jax

    from pallas_kernels.grouped_matmul import grouped_matmul

    def forward_backward(a, b, g, dy):
        y, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, g, impl="gpu", interpret=interpret), a, b)
        return y, vjp(dy)
    return forward_backward


def reference_fwd_bwd(x, w, gs, dy):
    """(y, (dx, dw)) in float32 at the highest precision: what the forward + backward rows are checked against."""
    import jax
    import jax.numpy as jnp

    f32 = lambda t: t.astype(jnp.float32)
    y, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, gs, precision="highest"), f32(x), f32(w))
    return y, vjp(f32(dy))


def max_rel_err(got, want) -> float:
    """The largest of max|got − want| / max|want| over the leaves of two matching trees."""
    import jax
    import numpy as np

    errs = [np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) /
            max(np.max(np.abs(np.asarray(b, np.float64))), 1e-30)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    return float(max(errs))


def gemm_row(args, G, R, K, N) -> dict:
    """Grouped GEMM TFLOP/s at one shape (DeepSeek-V3 expert shapes and the `small` preset's by default): ours
    (Mosaic GPU, BF16 and FP8 block-scaled) side by side with `jax.lax.ragged_dot`, JAX's example `ragged_dot_mgpu`,
    tokamax's BF16 `ragged_dot` on its Mosaic GPU kernel (the optional extra `tokamax`; a note where it is not
    installed), and where torch sees a CUDA GPU `torch._grouped_mm` (BF16) and `torch._scaled_grouped_mm` (FP8,
    row-wise scales); and the BF16 forward + backward (y, dx, dW: 3 GEMMs) through ours (grouped_matmul's custom
    VJP) and tokamax's VJP."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench.timing import median_seconds
    from pallas_kernels.fp8 import quantize_1x128, quantize_128x128
    from pallas_kernels.grouped_matmul import gpu as gmm_gpu
    from pallas_kernels.grouped_matmul import reference as gmm_reference

    sizes = group_sizes(G, R, args.skew)
    M = int(sizes.sum())
    flops = 2.0 * M * K * N
    kx, kw = jax.random.split(jax.random.key(G * 7 + K))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (G, K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes)
    x_q, x_s = quantize_1x128(x)
    w_q_GNK, w_s_GNbKb = jax.vmap(lambda w_KN: quantize_128x128(w_KN.T))(w)
    dy = (jax.random.normal(jax.random.key(G * 11 + N), (M, N), jnp.float32) / np.sqrt(N)).astype(jnp.bfloat16)
    interpret = args.interpret
    variants = {
        "ours_bf16": (lambda a, b, g: gmm_gpu.gmm(a, b, g, out_dtype=jnp.bfloat16, interpret=interpret), (x, w, gs)),
        "ours_fp8_blockwise": (lambda a, s, b, t, g: gmm_gpu.gmm_fp8(a, s, b, t, g, out_dtype=jnp.bfloat16,
                                                                      interpret=interpret),
                               (x_q, x_s, w_q_GNK, w_s_GNbKb, gs)),
        "xla_ragged_dot_bf16": (jax.lax.ragged_dot, (x, w, gs)),
        "ours_bf16_fwd_bwd": (_ours_fwd_bwd(interpret), (x, w, gs, dy)),
    }
    row = {"section": "gemm", "shape": f"{G}x{R} {K}->{N}", "rows": M}
    if not interpret:   # tokamax's Mosaic GPU kernels run on a Hopper GPU only (no interpreter)
        tokamax_fns, row["tokamax_error"] = tokamax_gemm_variants()
        for name, fn in tokamax_fns.items():
            variants[name] = (fn, (x, w, gs, dy) if name in FWD_BWD else (x, w, gs))
    if not interpret:
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

            variants["jax_example_ragged_dot_mgpu"] = (
                lambda a, b, g: ragged_dot_mgpu.ragged_dot(a, b, group_sizes=g, block_m=64, block_n=256, block_k=64,
                                                           max_concurrent_steps=4, grid_block_n=1), (x, w, gs))
        except ImportError as e:
            variants["jax_example_ragged_dot_mgpu"] = None
            print(f"moe: JAX's example ragged_dot_mgpu is unavailable ({e})")
    outputs = {}
    for name, spec in variants.items():
        if spec is None:
            continue
        fn, operands = spec
        fn = jax.jit(fn)
        try:
            outputs[name] = fn(*operands)
            if not interpret:
                work = 3 * flops if name in FWD_BWD else flops
                row[name] = work / median_seconds(fn, *operands, iters=args.iters)["median"] / 1e12
        except Exception as e:   # noqa: BLE001  one failing variant must not hide the others
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
    # bf16 against the float32 product; FP8 against the reference kernel on the same FP8 inputs (float32 output)
    refs = {"ours_bf16": jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), gs, precision="highest"),
            "ours_fp8_blockwise": gmm_reference.gmm_fp8(x_q, x_s, w_q_GNK, w_s_GNbKb, gs, out_dtype=jnp.float32)}
    refs["tokamax_ragged_dot_bf16"] = refs["ours_bf16"]
    for name, want in refs.items():
        if name in outputs:
            y, want = np.asarray(outputs[name], np.float64), np.asarray(want, np.float64)
            row[f"{name}_rel_err"] = float(np.max(np.abs(y - want)) / np.max(np.abs(want)))
    if any(name in outputs for name in FWD_BWD):   # y, dx, dW against float32 (the worst of the three)
        want = reference_fwd_bwd(x, w, gs, dy)
        for name in FWD_BWD:
            if name in outputs:
                row[f"{name}_rel_err"] = max_rel_err(outputs[name], want)
    for name, t in ({} if interpret else _torch_gemm(x, w, sizes, args.iters)).items():
        row[name] = flops / t["median"] / 1e12 if "median" in t else None
        if "error" in t:
            row[f"{name}_error"] = t["error"]
    base = row.get("torch_grouped_mm_bf16") or row.get("xla_ragged_dot_bf16")
    for name in ("ours_bf16", "ours_fp8_blockwise"):
        if base and row.get(name):
            row[f"{name}_vs_base"] = row[name] / base
    if row.get("ours_bf16_fwd_bwd") and row.get("tokamax_bf16_fwd_bwd"):
        row["ours_vs_tokamax_fwd_bwd"] = row["ours_bf16_fwd_bwd"] / row["tokamax_bf16_fwd_bwd"]
    return row


def random_routing(T: int, K: int, E: int, seed: int = 0):
    """Top-K distinct experts per token, skewed like a real router (a Zipf-ish expert popularity)."""
    import jax
    import jax.numpy as jnp

    popularity = jnp.log(1.0 / jnp.arange(1, E + 1, dtype=jnp.float32))
    logits = popularity + jax.random.gumbel(jax.random.key(seed), (T, E))
    weights, experts = jax.lax.top_k(logits, K)
    return experts.astype(jnp.int32), jax.nn.softmax(weights, axis=-1)


def dispatch_rows(args, T, D, K, E) -> list[dict]:
    """Dispatch (gather into expert order, optionally quantizing to FP8) and combine (weighted scatter-add) in GB/s
    against a plain device-to-device copy of the same bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench.timing import median_seconds
    from pallas_kernels import dispatch as dk

    x = jax.random.normal(jax.random.key(T + D), (T, D), jnp.float32).astype(jnp.bfloat16)
    experts_TK, weights_TK = random_routing(T, K, E)
    impl = "gpu"   # run() refuses anything but a Hopper GPU or --interpret
    N = T * K
    row_bytes = D * 2
    rows = []
    ref = dk.dispatch(x, experts_TK, E, impl="reference")
    cases = {
        # name: (function, operands, bytes read + written)
        "dispatch_bf16": (lambda a, e: dk.dispatch(a, e, E, impl=impl, interpret=args.interpret).x_ND,
                          (x, experts_TK), 2 * N * row_bytes),
        "dispatch_fp8_fused": (lambda a, e: dk.dispatch(a, e, E, impl=impl, quantize=True,
                                                        interpret=args.interpret).x_q_ND,
                               (x, experts_TK), N * row_bytes + N * (D + 4 * -(-D // 128))),
        "combine": (lambda y, w: dk.combine(y, w, ref.order_N, jnp.bfloat16, row_TK=ref.row_TK, impl=impl,
                                            interpret=args.interpret),
                    (ref.x_ND, weights_TK), N * row_bytes + T * row_bytes),
    }
    copy_gbs = None
    if not args.interpret:   # one read and one write of an (N, D) operand: the bandwidth ceiling
        copy = jax.jit(lambda a: a * 2)
        big = jnp.ones((N, D), jnp.bfloat16)
        copy_gbs = 2 * N * row_bytes / median_seconds(copy, big, iters=args.iters)["median"] / 1e9
    for name, (fn, operands, nbytes) in cases.items():
        fn = jax.jit(fn)
        row = {"section": "dispatch", "shape": f"T{T} D{D} top{K} E{E}", "op": name, "impl": impl,
               "copy_GBps": copy_gbs}
        out = fn(*operands)
        if name == "dispatch_bf16":
            row["exact"] = bool(np.array_equal(np.asarray(out, np.float32), np.asarray(ref.x_ND, np.float32)))
        elif name == "combine":
            want = dk.combine(ref.x_ND, weights_TK, ref.order_N, jnp.float32, impl="reference")
            row["rel_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        if not args.interpret:
            row["GBps"] = nbytes / median_seconds(fn, *operands, iters=args.iters)["median"] / 1e9
            row["of_copy"] = row["GBps"] / copy_gbs
        rows.append(row)
    return rows


def layer_rows(args) -> list[dict]:
    """The MoE layer forward + backward (input and parameter gradients) on the platform's kernels vs the reference."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from dsv3_jax import kernels as kernel_registry
    from dsv3_jax.model.moe.layer import MoE
    from dsv3_jax.config.presets import PRESETS
    from experiments.bench.timing import median_seconds

    if args.layer_config not in PRESETS:
        raise SystemExit(f"--layer-config: unknown preset {args.layer_config!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[args.layer_config]
    rows = []
    for fp8 in (False, True):
        config = dataclasses.replace(base, fp8=fp8)
        x = jax.random.normal(jax.random.key(0), (1, args.layer_tokens, config.dim), jnp.float32)
        x = x.astype(config.jnp_dtype)
        variables = MoE(config, kernel_registry.REFERENCE).init(jax.random.key(1), x)
        on_kernels = (config.replace(kernels="pallas", kernel_target="tpu:interpret") if args.interpret
                      else config)
        kernels = kernel_registry.resolve(on_kernels, jax.devices())
        results = {}
        for label, ks in (("kernels", kernels), ("reference", kernel_registry.REFERENCE)):
            def loss(params, x_BTD, ks=ks):
                out, _ = MoE(config, ks).apply({**variables, "params": params}, x_BTD)
                return jnp.mean(out.astype(jnp.float32) ** 2)

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            value, grads = step(variables["params"], x)
            t = None if args.interpret else median_seconds(step, variables["params"], x, iters=args.iters)["median"]
            results[label] = (value, grads, t)
        (v_k, g_k, t_k), (v_r, g_r, t_r) = results["kernels"], results["reference"]
        rel = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                        jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-30))
                  for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_r)))
        rows.append({"section": "layer", "shape": f"{args.layer_config} T{args.layer_tokens}", "fp8": fp8,
                     "kernels": f"{kernels.dispatch}/{kernels.grouped_matmul}",
                     "ms_kernels": t_k and t_k * 1e3, "ms_reference": t_r and t_r * 1e3,
                     "speedup": (t_r / t_k) if t_k else None, "grad_rel_err": rel,
                     "loss_rel_err": float(abs(v_k - v_r) / abs(v_r))})
    return rows


def run(args) -> dict:
    """The three tables (`gemm_row`, `dispatch_rows`, `layer_rows`). On hosts without a Hopper GPU, `--interpret`
    runs the GPU kernels in JAX's GPU interpreter on small shapes (a correctness run, no timings)."""
    import jax

    from sharding.targets import platform_of

    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    gemm_shapes = parse_shapes("--gemm-shapes", "GRKN", args.gemm_shapes)
    dispatch_shapes = parse_shapes("--dispatch-shapes", "TDKE", args.dispatch_shapes)
    if not 0.0 <= args.skew < 1.0:
        raise SystemExit(f"--skew must be in [0, 1), got {args.skew}")
    if not args.interpret and platform_of(jax.devices()[0]) != "hopper":
        raise SystemExit("moe: our GPU kernels need a Hopper GPU (compute capability 9.x); on other hosts pass "
                         "--interpret with small shapes (a correctness run, not a measurement)")
    rows = []
    if "gemm" in sections:
        rows += [gemm_row(args, *shape) for shape in gemm_shapes]
    if "dispatch" in sections:
        rows += [r for shape in dispatch_shapes for r in dispatch_rows(args, *shape)]
    if "layer" in sections:
        rows += layer_rows(args)
    return {"rows": rows, "baseline": BASELINE, "interpreted": bool(args.interpret),
            "units": {"gemm": "TFLOP/s (2·rows·K·N / median seconds)", "dispatch": "GB/s read + written",
                      "layer": "ms per forward + backward"}}


def table(result) -> str:
    gemm = [r for r in result["rows"] if r["section"] == "gemm"]
    cols = [("shape", "shape", "s"), ("ours bf16", "ours_bf16", ".0f"), ("ours fp8", "ours_fp8_blockwise", ".0f"),
            ("torch bf16", "torch_grouped_mm_bf16", ".0f"), ("torch fp8 row", "torch_scaled_grouped_mm_fp8_rowwise", ".0f"),
            ("ragged_dot", "xla_ragged_dot_bf16", ".0f"), ("jax mgpu ex.", "jax_example_ragged_dot_mgpu", ".0f"),
            ("tokamax bf16", "tokamax_ragged_dot_bf16", ".0f"),
            ("bf16/base", "ours_bf16_vs_base", ".2f"), ("fp8/base", "ours_fp8_blockwise_vs_base", ".2f"),
            ("err bf16", "ours_bf16_rel_err", ".1e"), ("err fp8", "ours_fp8_blockwise_rel_err", ".1e"),
            ("err tokamax", "tokamax_ragged_dot_bf16_rel_err", ".1e")]
    fwd_bwd_cols = [("shape", "shape", "s"), ("ours", "ours_bf16_fwd_bwd", ".0f"),
                    ("tokamax", "tokamax_bf16_fwd_bwd", ".0f"), ("ours/tokamax", "ours_vs_tokamax_fwd_bwd", ".2f"),
                    ("err ours", "ours_bf16_fwd_bwd_rel_err", ".1e"),
                    ("err tokamax", "tokamax_bf16_fwd_bwd_rel_err", ".1e")]
    parts = ["grouped GEMM (TFLOP/s)\n" + format_table(gemm, cols)] if gemm else []
    if gemm:
        parts.append("grouped GEMM BF16 forward + backward (TFLOP/s of y, dx, dW)\n" + format_table(gemm, fwd_bwd_cols))
        notes = sorted({f"{k}: {r[k]}" for r in gemm for k in r if k.endswith("_error") and r[k]})
        if notes:
            parts.append("errors / not run:\n" + "\n".join(notes))
    dispatch = [r for r in result["rows"] if r["section"] == "dispatch"]
    if dispatch:
        parts.append("dispatch / combine (GB/s, read + written)\n" + format_table(dispatch, [
            ("shape", "shape", "s"), ("op", "op", "s"), ("impl", "impl", "s"), ("GB/s", "GBps", ".0f"),
            ("copy GB/s", "copy_GBps", ".0f"), ("of copy", "of_copy", ".2f"), ("exact", "exact", ""),
            ("rel err", "rel_err", ".1e")]))
    layer = [r for r in result["rows"] if r["section"] == "layer"]
    if layer:
        parts.append("MoE layer forward + backward (ms)\n" + format_table(layer, [
            ("shape", "shape", "s"), ("fp8", "fp8", ""), ("kernels", "kernels", "s"), ("ours", "ms_kernels", ".2f"),
            ("reference", "ms_reference", ".2f"), ("speedup", "speedup", ".2f"), ("grad err", "grad_rel_err", ".1e"),
            ("loss err", "loss_rel_err", ".1e")]))
    return "\n\n".join(parts)
