"""One point of the scaling study: the train step compiled for a mesh on abstract arguments (compile-only devices
too): per-device memory, FLOPs, collectives, the step-time estimate (compile-time) beside XLA's own sum, and on
request a few real steps timed."""

from __future__ import annotations

import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.counting import count_params
from dsv3_jax.train.build import build_step, compiled_memory
from dsv3_jax.train.mfu import mfu, peak_flops_per_device
from dsv3_jax.train.run_config import compile_run
from experiments.bench.sharding_memory import state_bytes
from experiments.cost_model import executed_flops_per_token, model_flops_per_token
from experiments.estimate import XLA_UNPRICED_CALLS, Estimate, est_mfu, estimate
from experiments.hardware import UnknownChip
from sharding import build_mesh, put_batch, targets

# HLO collective opcodes; an asynchronous one appears as `<kind>-start` (counted as its kind) and `<kind>-done`.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_COLLECTIVE_OP = re.compile(r"(?<![\w%.\-])(" + "|".join(sorted(COLLECTIVES, key=len, reverse=True)) + r")(-start)?\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective instructions per kind in HLO text, `-start` forms included; a loop body's are counted once."""
    counts = collections.Counter(m.group(1) for m in _COLLECTIVE_OP.finditer(hlo_text))
    return {kind: counts.get(kind, 0) for kind in COLLECTIVES}


def custom_call_counts(hlo_text: str) -> dict[str, int]:
    """Custom calls per target name in HLO text, most frequent first."""
    return dict(collections.Counter(_CUSTOM_CALL.findall(hlo_text)).most_common())


def summary(counts: dict[str, int]) -> str:
    """{'all-gather': 3, 'all-reduce': 0} -> 'all-gather:3' (zeros left out)."""
    return " ".join(f"{name}:{n}" for name, n in counts.items() if n)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
        cost = cost[0] if cost else None
    return cost or {}


def device_memory_bytes(device) -> int | None:
    """The device's memory: what a real device's allocator reports, the H100 target description's for a
    compile-only H100 (XLA:GPU compiles a program larger than that with a warning only), or the chip's HBM for a
    compile-only TPU (sharding.targets.TPU_HBM_BYTES; XLA fails a compile that does not fit there). None where
    unknown."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - compile-only devices and CPUs have no allocator to ask
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    platform = targets.platform_of(device)
    if platform in ("gpu", "hopper") and device.device_kind == targets.H100_SXM["description"]:
        return targets.H100_SXM["memory_bytes"]
    if platform == "tpu":
        return targets.TPU_HBM_BYTES.get(device.device_kind)
    return None


def describe(point, config: ModelConfig, batch: int, seq_len: int, target: str) -> dict:
    """The columns a point has before anything compiles (what an error row carries too)."""
    counts = count_params(config)
    return dict(target=target, preset=point.preset, mesh=point.mesh_name, strategy=point.strategy, fp8=point.fp8,
                schedule=point.schedule or "", devices=point.n_devices, micro=point.micro, batch=batch,
                seq_len=seq_len, tokens_per_step=point.micro * batch * seq_len,
                params_total=counts.total + counts.mtp_unique, params_activated=counts.activated,
                model_flops_per_token=model_flops_per_token(config, seq_len))


def measure(point, config: ModelConfig, devices: list, batch: int, seq_len: int, timed_steps: int,
            target: str, roofline: bool = False) -> dict:
    """Compile the step for `point` (an experiments.scaling.Point) on `devices[:point.n_devices]` and measure it;
    `timed_steps` > 0 also runs it (the devices must be real). Exceptions propagate: the caller records them.

    Per-device numbers come from the compiled SPMD program (jit(...).lower(...).compile()): `memory_analysis`
    (argument, output, alias, temp) and `cost_analysis` (FLOPs; on TPU also `optimal_seconds`); the exact state bytes
    of device 0 come from the shardings (experiments.bench.sharding_memory)."""
    mesh = build_mesh(point.axes, devices[:point.n_devices])
    row = describe(point, config, batch, seq_len, target)
    step = build_step(compile_run(config, batch=batch, seq_len=seq_len, micro=point.micro, strategy=point.strategy,
                                  schedule=point.schedule or "1f1b"), mesh)   # the kernels the target's chips run
    pipelined = step.pipeline is not None
    built = step.compile()
    compiled = built.compiled
    row["compile_s"] = built.lower_s + built.compile_s
    row["kernels"] = f"{step.kernels.attention}/{step.kernels.grouped_matmul}"

    device = mesh.devices.flat[0]
    row["device_kind"] = device.device_kind
    row.update(state_bytes(step.abstract_state, step.shardings, device))
    memory = compiled_memory(compiled)
    row.update({f"{k}_size_in_bytes": v for k, v in memory.items() if k != "peak"})
    row["peak_bytes_per_device"] = memory.get("peak")
    row["device_memory_bytes"] = device_memory_bytes(device)
    if row["device_memory_bytes"] and row["peak_bytes_per_device"] is not None:
        row["fits"] = row["peak_bytes_per_device"] <= row["device_memory_bytes"]
    hlo = compiled.as_text()
    collectives = collective_counts(hlo)
    row.update({f"n_{kind.replace('-', '_')}": n for kind, n in collectives.items()})
    row["collectives"] = summary(collectives)
    custom_calls = custom_call_counts(hlo)
    row["custom_calls"] = summary(custom_calls)

    cost = _cost(compiled)
    xla_flops = float(cost["flops"]) if "flops" in cost else None
    executed = executed_flops_per_token(config, seq_len) * row["tokens_per_step"] / point.n_devices
    row.update(xla_flops_per_device=xla_flops, cost_model_flops_per_device=executed,
               xla_vs_cost_model=None if xla_flops is None else xla_flops / executed,
               xla_bytes_accessed_per_device=cost.get("bytes accessed"))
    try:
        est = estimate(compiled, roofline=roofline, hlo_text=hlo, tick_branches=step.tick_branches)
    except UnknownChip:   # a chip the estimate has no figures for (a CPU)
        est = None
    row.update(estimate_columns(est, row))
    row.update(tpu_cost_model(cost, custom_calls, row, pipelined, device, est))
    if timed_steps > 0:
        batches = put_batch(mesh, {"tokens": np.zeros((point.micro, batch, seq_len), np.int32)}, batch_dim=1)
        everywhere = NamedSharding(mesh, PartitionSpec())
        scalars = tuple(jax.device_put(jnp.float32(x), everywhere) for x in (0, np.inf))
        row.update(time_steps(compiled, step.init_state, batches, scalars, timed_steps,
                              row["tokens_per_step"], row["model_flops_per_token"], point.n_devices, device))
    return row


def extrapolated_cost(point, config: ModelConfig, devices: list, batch: int, seq_len: int, depths: tuple[int, int],
                      target: str) -> dict:
    """XLA's FLOPs and TPU cost-model step time of the full-depth step from two shallow copies of it (the dense
    blocks and depths[0] / depths[1] MoE layers, unrolled), extrapolated linearly in the MoE layers: XLA's cost
    analysis counts a scanned layer once, and the full model unrolled compiles too slowly to study. Returns the
    columns measure() gives (xla_flops_per_device, xla_vs_cost_model, xla_cost_model_step_s, xla_cost_model_mfu)
    plus cost_depths ("k1,k2") and the shallow compiles' seconds in cost_compile_s."""
    k1, k2 = depths
    shallow = [measure(point, config.replace(n_layers=config.first_k_dense_replace + k, scan_layers=False), devices,
                       batch, seq_len, 0, target) for k in depths]
    extend = lambda key: (None if any(r.get(key) is None for r in shallow) else
                          shallow[0][key] + (config.n_moe_layers - k1) * (shallow[1][key] - shallow[0][key]) / (k2 - k1))
    row = describe(point, config, batch, seq_len, target)
    flops, seconds = extend("xla_flops_per_device"), extend("xla_cost_model_step_s")
    executed = executed_flops_per_token(config, seq_len) * row["tokens_per_step"] / point.n_devices
    out = dict(xla_flops_per_device=flops, xla_vs_cost_model=None if flops is None else flops / executed,
               xla_cost_model_step_s=seconds, xla_cost_model_mfu=None, cost_depths=f"{k1},{k2}",
               cost_compile_s=sum(r["compile_s"] for r in shallow))
    peak = peak_flops_per_device(devices[0])
    if seconds and seconds > 0 and peak:
        out["xla_cost_model_mfu"] = row["model_flops_per_token"] * row["tokens_per_step"] / (
            point.n_devices * seconds * peak)
    return out


ESTIMATE_COLUMNS = ("compute_s", "comm_s", "exposed_comm_s", "est_step_s", "est_mfu", "est_flops_per_device",
                    "bytes_all_to_all", "bytes_all_to_all_internode", "bytes_all_to_all_intranode",
                    "bytes_all_gather", "bytes_reduce_scatter", "bytes_all_reduce", "bytes_collective_permute",
                    "est_dynamic_loops", "est_chip", "est_roofline")


def estimate_columns(est: Estimate | None, row: dict) -> dict:
    """The step-time estimate's columns (experiments.estimate; all per device per step, compile-time, None without
    an estimate): est_mfu = model FLOPs per device / (est_step_s × the chip's BF16 peak), None where impossible."""
    if est is None:
        return dict.fromkeys(ESTIMATE_COLUMNS)
    model_flops = row["model_flops_per_token"] * row["tokens_per_step"] / row["devices"]
    out = {key: getattr(est, key) for key in ("compute_s", "comm_s", "exposed_comm_s", "est_step_s",
                                              "bytes_all_to_all", "bytes_all_to_all_internode",
                                              "bytes_all_to_all_intranode", "bytes_all_gather",
                                              "bytes_reduce_scatter", "bytes_all_reduce", "bytes_collective_permute")}
    return dict(out, est_mfu=est_mfu(model_flops, est), est_flops_per_device=est.flops,
                est_dynamic_loops=len(est.dynamic_loops), est_chip=est.chip, est_roofline=est.roofline)


def undercounts_loops(est: Estimate, tolerance: float = 0.9) -> bool:
    """Whether XLA's own cost analysis misses work the estimate counts in loops that run more than once (a scanned
    layer stack; a small chunked loop in the loss does not move it): its FLOPs below `tolerance` of the estimate's
    matmul FLOPs."""
    return bool(est.repeated_loops) and est.xla_flops is not None and est.xla_flops < tolerance * est.flops


def tpu_cost_model(cost: dict, custom_calls: dict, row: dict, pipelined: bool, device,
                   est: Estimate | None = None) -> dict:
    """On TPU, XLA's cost-model step time and the MFU it implies: model FLOPs per step / devices / step seconds /
    the chip's peak (dsv3_jax.train.mfu). The step time is `optimal_seconds` with the -1 s XLA gives each
    XLA_UNPRICED_CALLS call (experiments.estimate: the asynchronous calls around the gathers it offloads) taken
    out (the raw value is kept too), so it leaves out whatever those calls do. No step time or MFU where it cannot be
    one: a pipelined step, a program whose repeated loops hold a share of its work that XLA's sum misses (it counts
    a loop body once: undercounts_loops), a time that is not positive, an MFU above 100%. None on other platforms."""
    out = dict(xla_cost_model_raw_s=None, xla_cost_model_unpriced=None, xla_cost_model_step_s=None,
               xla_cost_model_mfu=None)
    raw = cost.get("optimal_seconds") if targets.platform_of(device) == "tpu" else None
    if raw is None:
        return out
    unpriced = sum(custom_calls.get(name, 0) for name in XLA_UNPRICED_CALLS)
    seconds = float(raw) + unpriced
    counted_once = pipelined or (est is not None and undercounts_loops(est))
    out.update(xla_cost_model_raw_s=float(raw), xla_cost_model_unpriced=unpriced,
               xla_cost_model_step_s=seconds if seconds > 0 and not counted_once else None)
    peak = peak_flops_per_device(device)
    if out["xla_cost_model_step_s"] and peak:
        mfu_value = row["model_flops_per_token"] * row["tokens_per_step"] / (row["devices"] * seconds * peak)
        out["xla_cost_model_mfu"] = mfu_value if mfu_value <= 1 else None
    return out


def time_steps(compiled, init, batches, scalars, n_steps: int, step_tokens: int, flops_per_token: float,
               n_devices: int, device) -> dict:
    """One warm-up step, then the mean wall time of `n_steps` more (state donated from step to step)."""
    state = init()
    state, metrics = compiled(state, batches, *scalars)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n_steps):
        state, metrics = compiled(state, batches, *scalars)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / n_steps
    tokens_per_s = step_tokens / step_s
    return dict(step_s=step_s, tokens_per_s=tokens_per_s,
                mfu=mfu(tokens_per_s, flops_per_token, n_devices, peak_flops_per_device(device)))
