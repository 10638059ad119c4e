"""Every Pallas kernel compiled ahead of time for chips this host does not have: the Mosaic GPU and Pallas-Triton
kernels for an H100 (ptxas's registers, spill bytes and the launch's shared memory per Mosaic GPU kernel), the
Pallas TPU kernels for TPU v5e, v5p and v6e (compile seconds and the flops XLA's cost model sees, which come
from the kernels' cost estimates). Shapes are a preset's MoE layer (`--presets`, default small and v3-671b):
tokens per device × top-k rows into n_routed_experts groups of dim → moe_intermediate_size, the dense FP8 GEMM
dim → intermediate_size and back. A compile error is a row with its one-line message, not a crash.

Nothing runs: the devices are compile-only (sharding.targets). Baseline: none; the numbers are the compilers'.
Also the helpers tests/aot/test_kernels_aot.py compiles with (`kernel_cases`, `compile_case`).
"""

from __future__ import annotations

import dataclasses
import glob
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

    @property
    def rows(self) -> int:           # rows of the grouped operand (dropless, no expert parallelism)
        return self.T * self.top_k

    @property
    def aligned_rows(self) -> int:   # the FP8 weight gradient's 128-aligned layout (grouped_matmul.layout)
        return -(-(self.rows + self.E * 127) // 128) * 128


def preset_shapes(preset: str, tokens: int | None = None) -> LayerShapes:
    from dsv3_jax.config.presets import get_preset

    c = get_preset(preset)
    return LayerShapes(preset, tokens or PRESET_TOKENS.get(preset, 4096), c.dim, c.moe_intermediate_size,
                       c.n_routed_experts, c.num_experts_per_tok, c.intermediate_size, c.dtype)


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One kernel call to compile: `fn(*args)` with args given as (shape, dtype) pairs; `devices` > 1 runs it in a
    mesh of that many devices along axis "x", each arg sharded by its spec (None: replicated). `flops`: the
    arithmetic the call does by its shapes (None for pure data movement), what its cost estimate should say."""
    kernel: str
    backend: str                 # "mosaic_gpu", "triton", "pallas_tpu" or "reference"
    shapes: str
    fn: Callable
    args: tuple
    flops: int | None = None
    specs: tuple | None = None
    devices: int = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _short(dtype) -> str:
    import jax.numpy as jnp

    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(jnp.dtype(dtype).name, jnp.dtype(dtype).name)


def _fp8_cases(fp8_matmul, backend: str, s: LayerShapes) -> list[KernelCase]:
    """The dense FP8 GEMM (pallas_kernels.fp8 layout) up (dim → intermediate) and down (K = intermediate)."""
    import jax.numpy as jnp

    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    T, D, I = s.T, s.D, s.I
    return [KernelCase("fp8_matmul", backend, f"{T}x{K}->{N}", lambda a, sa, b, sb: fp8_matmul(a, sa, b, sb),
                       (((T, K), f8), ((T, _cdiv(K, 128)), f32), ((K, N), f8), ((_cdiv(K, 128), _cdiv(N, 128)), f32)),
                       flops=2 * T * K * N)
            for K, N in ((D, I), (I, D))]


def _grouped_cases(module, backend: str, s: LayerShapes, dtype) -> list[KernelCase]:
    """The five grouped-matmul protocol functions of `module` for the layer's up projection (dim → F per expert)."""
    import jax.numpy as jnp

    f8, f32, i32 = jnp.float8_e4m3fn, jnp.float32, jnp.int32
    M, P, D, F, E = s.rows, s.aligned_rows, s.D, s.F, s.E
    Db, Fb, Pb = _cdiv(D, 128), _cdiv(F, 128), _cdiv(P, 128)
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
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.all_to_all import all_to_all

    block = _cdiv(s.rows, devices * devices)

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
    with jax.set_mesh(mesh):
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
            report = _read_dumps(tmp)
            if report["ptxas_reports"]:
                _GPU_REPORTS.update({h: report for h in hashes})
            elif len(hashes) == 1 and hashes[0] in _GPU_REPORTS:
                report = _GPU_REPORTS[hashes[0]]
            for key, value in report.items():
                setattr(result, key, value)
    return result


# ---- the benchmark ----

def add_arguments(parser) -> None:
    parser.add_argument("--presets", default="small,v3-671b", help="comma-separated presets (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=0,
                        help="tokens per device (default: small 16384, v3-671b 4096, tiny 1024)")
    parser.add_argument("--platforms", default="gpu,tpu", help="gpu, tpu or both (default: %(default)s)")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names to keep (default: all)")
    parser.add_argument("--no-references", dest="references", action="store_false",
                        help="skip compiling the jnp references (FP8 GEMM, grouped matmuls) for each target")


def _row(preset: str, target: str, case: KernelCase, r: Compiled) -> dict:
    return {"preset": preset, "target": target, "kernel": case.kernel, "backend": case.backend, "shapes": case.shapes,
            "nominal_flops": case.flops, **dataclasses.asdict(r)}


def run(args) -> dict:
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
                cases = kernel_cases(platform, shapes) + (reference_cases(shapes) if args.references else [])
                rows += [_row(preset, target, case, compile_case(case, target))
                         for case in cases if not keep or case.kernel in keep]
    return {"rows": rows, "baseline": BASELINE,
            "units": "seconds to lower + compile; GFLOP from XLA's cost analysis of the program (TPU) and by shape "
                     "(nominal); registers per thread at launch and consumer/producer after setmaxnreg; SMEM per CTA"}


def table(result) -> str:
    cols = [("preset", "preset", "s"), ("target", "target", "s"), ("kernel", "kernel", "s"),
            ("backend", "backend", "s"), ("shapes", "shapes", "s"), ("ok", lambda r: "ok" if r["ok"] else "ERROR", "s"),
            ("compile s", "seconds", ".1f"),
            ("GFLOP cost", lambda r: r["cost_flops"] / 1e9 if r.get("cost_flops") is not None else None, ".4g"),
            ("GFLOP nominal", lambda r: r["nominal_flops"] / 1e9 if r.get("nominal_flops") else None, ".4g"),
            ("regs", "registers", "d"), ("setmaxnreg", "setmaxnreg", "s"), ("spill B", "spill_bytes", "d"),
            ("SMEM KiB", lambda r: r["smem_bytes"] / 1024 if r.get("smem_bytes") else None, ".1f")]
    text = format_table(result["rows"], cols)
    errors = [f"{r['preset']} {r['target']} {r['kernel']} ({r['backend']}): {r['error']}"
              for r in result["rows"] if not r["ok"]]
    return text + ("\n\nerrors:\n" + "\n".join(errors) if errors else "")
