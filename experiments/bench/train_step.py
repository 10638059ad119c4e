"""Whole-model training throughput on one device: our train step, built as the pre-training job builds it, against
Hugging Face transformers' DeepseekV3ForCausalLM of the same config, batch and AdamW: tokens/s, MFU, peak memory.
Baseline: transformers with experts_implementation="grouped_mm".
"""

from __future__ import annotations

import gc
import glob
import gzip
import json
import os
import shutil
import time
from collections import defaultdict

from experiments.bench import format_table

NAME = "train_step"
SUMMARY = "train step of a run preset, ours vs transformers DeepseekV3 (grouped_mm / eager experts): tokens/s, MFU"
BASELINE = 'transformers DeepseekV3ForCausalLM, experts_implementation="grouped_mm"'
DEVICES = 0
USES_JAX = True
TORCH_EXPERTS = ("grouped_mm", "eager")
TOP_OPS = 20


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="small", help="run preset (experiments.presets; default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides",
                        help="override a run-config field, as in experiments.pretrain (e.g. model.fp8=true)")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, compile included (default: "
                        "%(default)s)")
    parser.add_argument("--docs-per-row", type=int, default=1,
                        help="ours only: pack this many documents per row (segment ids and positions, as the "
                             "pre-training data does); 1 passes none (default: %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers rows")
    parser.add_argument("--torch-experts", default=",".join(TORCH_EXPERTS),
                        help="transformers experts_implementation values, comma-separated (default: %(default)s)")
    parser.add_argument("--torch-attn", default="sdpa", help="transformers attn_implementation (default: %(default)s)")
    parser.add_argument("--torch-precision", choices=("bf16", "amp"), default="bf16",
                        help="bf16: parameters and AdamW in bfloat16; amp: float32 parameters under bfloat16 "
                             "autocast (default: %(default)s)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="write a JAX trace of --profile-steps steps")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps traced with --profile (default: "
                        "%(default)s)")


# ---- configuration and data ------------------------------------------------------------------------
def resolve(args):
    """The run config of the pre-training job for this preset, batch and length (validated the same way)."""
    from dsv3_jax.config import ConfigError
    from dsv3_jax.train.run_config import RunConfig, validate_run
    from experiments.presets import get_run_preset

    try:
        cfg = get_run_preset(args.config).with_overrides(*args.overrides)
        data = cfg.data.__class__(**{**cfg.data.__dict__, "batch_size": args.batch, "seq_len": args.seq_len})
        cfg = RunConfig(**{**cfg.__dict__, "data": data})
        validate_run(cfg)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    for name, value in (("--steps", args.steps), ("--batch", args.batch), ("--seq-len", args.seq_len),
                        ("--docs-per-row", args.docs_per_row), ("--profile-steps", args.profile_steps)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    return cfg


def make_batch(cfg, docs_per_row: int, seed: int = 0) -> dict:
    """(micro-batches, rows, length) random tokens; with docs_per_row > 1 also segment ids and positions."""
    import numpy as np

    A, B, T = cfg.train.grad_accum, cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    batch = {"tokens": rng.integers(0, cfg.model.vocab_size, (A, B, T), dtype=np.int32)}
    if docs_per_row > 1:
        length = -(-T // docs_per_row)
        segment_T = np.arange(T, dtype=np.int32) // length
        batch["segment_ids"] = np.broadcast_to(segment_T, (A, B, T)).copy()
        batch["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32) - segment_T * length, (A, B, T)).copy()
    return batch


def _throughput(row: dict, times: dict, tokens: int, flops_per_token: float, peak_flops) -> None:
    from dsv3_jax.train.mfu import mfu

    tok_s = tokens / times["median"]
    row.update(step_s=times["median"], step_min_s=times["min"], step_max_s=times["max"], tokens_per_s=tok_s,
               flops_per_token=flops_per_token, mfu=mfu(tok_s, flops_per_token, 1, peak_flops))


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ---- ours ------------------------------------------------------------------------------------------
def run_ours(cfg, batch_np: dict, args) -> dict:
    """Our step as experiments.pretrain builds it, compiled once (AOT) for the timing and the memory analysis."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from dsv3_jax.model.counting import train_flops_per_token
    from dsv3_jax.train.build import build_step, compiled_memory
    from dsv3_jax.train.mfu import peak_flops_per_device
    from dsv3_jax.train.run_config import mesh_axes
    from experiments.bench.timing import median_seconds
    from sharding.mesh import build_mesh, put_batch

    built = build_step(cfg, build_mesh(mesh_axes(cfg)))
    mesh, model, kernels = built.mesh, built.model, built.kernels
    row = {"impl": "ours (jax)", "attention_impl": kernels.attention, "remat_policy": model.remat_policy,
           "fp8": model.fp8, "packed_docs": args.docs_per_row}
    state = built.init_state()
    step = built.jitted
    batch = put_batch(mesh, batch_np, batch_dim=1)
    everywhere = NamedSharding(mesh, PartitionSpec())
    scalars = [jax.device_put(jnp.float32(x), everywhere) for x in (0.0, np.inf)]

    start = time.perf_counter()
    compiled = step.lower(state, batch, *scalars).compile()
    row["compile_s"] = time.perf_counter() - start
    row["state_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state))
    memory = compiled_memory(compiled)
    if memory:
        row.update(donated_bytes=memory["alias"], temp_bytes=memory["temp"], compiled_peak_bytes=memory["peak"])

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch, *scalars)
        return holder["state"], metrics

    first_state = holder["state"]
    jax.block_until_ready(one_step())
    row["state_donated"] = all(x.is_deleted() for x in jax.tree.leaves(first_state))
    del first_state, state
    times = median_seconds(one_step, warmup=max(args.warmup - 1, 0), iters=args.steps)
    tokens = int(np.prod(batch_np["tokens"].shape))
    _throughput(row, times, tokens, train_flops_per_token(model, cfg.data.seq_len), peak_flops_per_device())
    _, metrics = one_step()
    row.update(loss=float(metrics["loss"]), ce=float(metrics["ce"]))

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row.update(peak_bytes=int(stats["peak_bytes_in_use"]), peak_source="memory_stats")
    elif "compiled_peak_bytes" in row:
        row.update(peak_bytes=row["compiled_peak_bytes"], peak_source="memory_analysis")

    if args.profile:
        try:
            with jax.profiler.trace(args.profile, create_perfetto_trace=True):
                for _ in range(args.profile_steps):
                    jax.block_until_ready(one_step())
            row["profile"] = collect_profile(args.profile, args.profile_steps)
        except Exception as e:   # noqa: BLE001 - the timings above stand without the trace
            row["profile"] = {"error": _error(e)}
    return row


def collect_profile(directory: str, steps: int) -> dict:
    """Flat copies of the newest trace (Perfetto JSON, XPlane) and the device time per op name, per step."""
    traces = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "*perfetto_trace.json.gz")),
                    key=os.path.getmtime)
    if not traces:
        return {"error": f"no perfetto_trace.json.gz under {directory}/plugins/profile"}
    run_dir = os.path.dirname(traces[-1])
    shutil.copyfile(traces[-1], os.path.join(directory, "jax_trace.json.gz"))
    for xplane in glob.glob(os.path.join(run_dir, "*.xplane.pb"))[:1]:
        shutil.copyfile(xplane, os.path.join(directory, "jax.xplane.pb"))
    with gzip.open(traces[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return {"trace": os.path.join(directory, "jax_trace.json.gz"), **summarize_trace(events, steps)}


def summarize_trace(events: list, steps: int) -> dict:
    """Per device thread (kernels on a stream, XLA ops, modules): busy ms per step and its top ops as
    [name, ms per step, calls per step], longest first.

    Device processes are the ones named "/device:..."; a CPU-only trace has none, and its host threads stand in.
    """
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    keep = devices or set(processes)
    per_thread = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in keep:
            where = f"{processes.get(e['pid'], e['pid'])} / {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
            slot = per_thread[where][e.get("name", "?")]
            slot[0] += float(e.get("dur", 0.0)) / 1e3
            slot[1] += 1
    summary = {}
    for where, ops in per_thread.items():
        ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])
        summary[where] = {"busy_ms_per_step": sum(ms for ms, _ in ops.values()) / steps,
                          "top_ops": [[name, ms / steps, count / steps] for name, (ms, count) in ranked[:TOP_OPS]]}
    return {"steps": steps, "device_trace": bool(devices), "threads": summary}


# ---- transformers ------------------------------------------------------------------------------------
def run_torch(cfg, batch_np: dict, experts: str, args) -> dict:
    """transformers' model of the same config, trained with torch.optim.AdamW on the same tokens; its memory is
    freed afterwards, and a failure leaves its error in the row."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    row = {"impl": f"transformers {experts}", "attention_impl": args.torch_attn, "precision": args.torch_precision,
           "packed_docs": 1, "transformers": transformers.__version__, "torch": torch.__version__}
    try:
        _train_torch(cfg, batch_np, experts, args, row)
    except Exception as e:   # noqa: BLE001 - the row says why this variant has no numbers
        row["error"] = _error(e)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def _train_torch(cfg, batch_np: dict, experts: str, args, row: dict) -> None:
    import torch
    import transformers

    from dsv3_jax.model.counting import train_flops_per_token
    from dsv3_jax.train.mfu import peak_flops_per_device
    from experiments.bench.timing import median_seconds, torch_median_seconds

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hf = dict(cfg.model.to_hf())
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf, experts_implementation=experts,
                                               attn_implementation=args.torch_attn)
    torch.manual_seed(cfg.train.seed)
    with device:
        model = getattr(transformers, hf["architectures"][0])(config)
    if args.torch_precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    row["experts_impl_used"] = getattr(model.config, "_experts_implementation", None)
    o = cfg.optimizer
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if "norm" not in n], "weight_decay": o.weight_decay},
              {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]   # as ours: norms undecayed
    optimizer = torch.optim.AdamW(groups, lr=cfg.schedule.peak_lr, betas=(o.b1, o.b2), eps=o.eps,
                                  **({"fused": True} if cuda else {}))
    tokens = torch.as_tensor(batch_np["tokens"], dtype=torch.long, device=device)
    params = [p for _, p in named]
    last = {}

    def one_step():
        for micro in tokens:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.torch_precision == "amp"):
                loss = model(input_ids=micro, labels=micro).loss
            (loss / len(tokens)).backward()
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()
        return last["loss"]

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        times = torch_median_seconds(one_step, warmup=max(args.warmup, 1), iters=args.steps)
        row.update(peak_bytes=int(torch.cuda.max_memory_allocated()), peak_source="torch.cuda")
    else:
        times = median_seconds(one_step, warmup=max(args.warmup, 1), iters=args.steps)
    no_mtp = cfg.model.replace(num_mtp_modules=0)   # transformers has no MTP module
    _throughput(row, times, tokens.numel(), train_flops_per_token(no_mtp, cfg.data.seq_len), peak_flops_per_device())
    row.update(loss=float(last["loss"]), ce=float(last["loss"]))


# ---- the benchmark -------------------------------------------------------------------------------------
def run(args) -> dict:
    """Ours (run preset, dsv3_jax.train.build.build_step, the state donated) against transformers'
    DeepseekV3ForCausalLM of the same config (`ModelConfig.to_hf`), batch and AdamW (betas, eps, weight decay off the
    norms, clipping), once per `experts_implementation` (grouped_mm, eager per-expert loop).

    Random tokens; warm-up steps, then the median of timed steps (a JAX step is synchronised on its whole output, a
    PyTorch CUDA step timed with CUDA events). Tokens/s; MFU with the pre-training job's FLOP count
    (dsv3_jax.model.counting.train_flops_per_token; transformers has no MTP, so its rows count FLOPs without it);
    peak device memory (the allocator's peak where the device reports one, else XLA's compiled memory analysis).
    PyTorch runs first and frees its cache; JAX does not preallocate (XLA_PYTHON_CLIENT_PREALLOCATE=false unless
    set), so each side finds the GPU free. A variant that fails leaves its error in its row.
    `--profile DIR` writes a JAX trace of a few more steps (TensorBoard/XProf `plugins/profile/...`, plus flat copies
    `DIR/jax_trace.json.gz` (Perfetto) and `DIR/jax.xplane.pb`) and puts the device time per op in the JSON."""
    from dsv3_jax.model.counting import count_params
    import jax

    from dsv3_jax import kernels as kernel_registry

    # JAX would otherwise take 75% of the GPU when it first starts (resolve() asks it for its devices).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = resolve(args)
    experts = [e.strip() for e in args.torch_experts.split(",") if e.strip()]
    batch = make_batch(cfg, args.docs_per_row, cfg.train.seed)
    rows = [] if args.no_torch else [run_torch(cfg, batch, e, args) for e in experts]
    try:
        ours = run_ours(cfg, batch, args)
    except Exception as e:   # noqa: BLE001 - keep the transformers rows
        ours = {"impl": "ours (jax)", "error": _error(e)}
    rows.insert(0, ours)
    base = next((r for r in rows if r["impl"] == "transformers grouped_mm" and "error" not in r), None)
    for row in rows:
        row["vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"] if base and "tokens_per_s" in row else None
    counts = count_params(cfg.model)
    kernels = kernel_registry.resolve(cfg.model, jax.devices())
    config = dict(preset=args.config, overrides=list(args.overrides), batch=cfg.data.batch_size,
                  seq_len=cfg.data.seq_len, micro_batches=cfg.train.grad_accum, steps=args.steps, warmup=args.warmup,
                  docs_per_row=args.docs_per_row, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                  params=counts.total, activated_params=counts.activated, moe_dispatch=kernels.dispatch,
                  moe_grouped_matmul=kernels.grouped_matmul, attention=kernels.attention)
    return {"config": config, "baseline": BASELINE, "rows": rows}


def _gib(row):
    return row["peak_bytes"] / 2**30 if row.get("peak_bytes") is not None else None


COLUMNS = [("impl", "impl", "s"), ("attention", "attention_impl", "s"),
           ("step ms", lambda r: r["step_s"] * 1e3 if "step_s" in r else None, ".1f"),
           ("min ms", lambda r: r["step_min_s"] * 1e3 if "step_min_s" in r else None, ".1f"),
           ("tokens/s", "tokens_per_s", ",.0f"), ("MFU", "mfu", ".1%"), ("peak GiB", _gib, ".2f"),
           ("vs grouped_mm", "vs_baseline", ".2f"), ("loss", "loss", ".3f"),
           ("error", lambda r: (r["error"][:60] if "error" in r else None), "s")]


def table(result: dict) -> str:
    c = result["config"]
    head = (f"{c['preset']} {' '.join(c['overrides'])}".strip()
            + f": {c['params'] / 1e6:,.1f}M params ({c['activated_params'] / 1e6:,.1f}M activated), "
              f"{c['micro_batches']}×{c['batch']}×{c['seq_len']} tokens/step, {c['dtype']} compute, "
              f"MoE kernels {c['moe_grouped_matmul']}/{c['moe_dispatch']}; median of {c['steps']} steps after "
              f"{c['warmup']}; baseline: {result['baseline']}")
    lines = [head, format_table(result["rows"], COLUMNS)]
    for row in result["rows"]:
        profile = row.get("profile") or {}
        for where, info in (profile.get("threads") or {}).items():
            if profile.get("device_trace"):
                top = ", ".join(f"{n[:40]} {ms:.2f}" for n, ms, _ in info["top_ops"][:5])
                lines.append(f"profile {where}: {info['busy_ms_per_step']:.1f} ms/step busy; top (ms/step): {top}")
        if profile.get("trace") or profile.get("error"):
            lines.append(f"{row['impl']} profile: {profile.get('trace') or profile['error']}")
    return "\n".join(lines)
