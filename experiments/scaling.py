"""Scaling study: the sharded train step AOT-compiled per (preset, mesh, FP8, pipeline schedule) for this machine's
devices or a cluster it does not have (--target): per-device memory, FLOPs, collectives, on TPU targets the cost
model's step time and MFU, on accelerators measured tokens/s and MFU. Writes DIR/scaling.csv and three plots.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys

from experiments.bench import format_table, simulate_devices
from experiments.bench.sharding_memory import parse_mesh

EXIT_POINT_FAILED = 1
EXIT_BAD_INPUT = 2
DEFAULT_MESHES = ("data=8", "fsdp=8", "data=2,expert=4")
FP8_CHOICES = {"off": (False,), "on": (True,), "both": (False, True)}
UNROLLED = ("scan_layers=false",)
CSV_COLUMNS = ("target", "device_kind", "preset", "mesh", "strategy", "schedule", "fp8", "devices", "micro", "batch",
               "seq_len", "tokens_per_step", "params_total", "params_activated", "params_bytes", "opt_state_bytes",
               "moe_bias_bytes", "state_bytes", "argument_size_in_bytes", "output_size_in_bytes",
               "alias_size_in_bytes", "temp_size_in_bytes", "peak_bytes_per_device", "device_memory_bytes", "fits",
               "xla_flops_per_device", "cost_model_flops_per_device", "xla_vs_cost_model", "model_flops_per_token",
               "xla_bytes_accessed_per_device", "xla_cost_model_raw_s", "xla_cost_model_unpriced",
               "xla_cost_model_step_s", "xla_cost_model_mfu", "compute_s", "comm_s", "exposed_comm_s", "est_step_s",
               "est_mfu", "est_flops_per_device", "bytes_all_to_all", "bytes_all_to_all_internode",
               "bytes_all_to_all_intranode", "bytes_all_gather", "bytes_reduce_scatter",
               "bytes_all_reduce", "bytes_collective_permute", "est_dynamic_loops", "est_chip", "est_roofline",
               "n_all_reduce", "n_all_gather", "n_reduce_scatter", "n_all_to_all", "n_collective_permute",
               "n_ragged_all_to_all", "collectives", "custom_calls", "kernels", "bubble_fraction", "compile_s",
               "cost_depths",
               "cost_compile_s", "step_s",
               "tokens_per_s", "mfu", "error")


@dataclasses.dataclass(frozen=True)
class Point:
    """What one compile covers."""
    preset: str
    mesh: tuple[tuple[str, int], ...]      # axis sizes, in the order given on the command line
    strategy: str
    fp8: bool
    schedule: str | None                   # pipeline schedule (meshes with pipeline > 1 only)
    micro: int                             # micro-batches per step

    @property
    def axes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def n_devices(self) -> int:
        return math.prod(self.axes.values())

    @property
    def mesh_name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.mesh)


class UsageError(ValueError):
    """A bad command-line argument; the message starts with the argument's name."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's own errors as one line, exit code 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.scaling", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None, help="compile for these devices instead of the ones JAX has: cpu, "
                   "h100, h100xN, or a TPU topology such as v5e:2x2, v5p:2x2x1, v6e:2x4, v5p:8x8x8 (compile only; "
                   "every mesh must use all of its devices)")
    p.add_argument("--presets", default="tiny,small", help="comma-separated model presets (default: %(default)s)")
    p.add_argument("--meshes", nargs="+", default=list(DEFAULT_MESHES), metavar="AXES[/STRATEGY]",
                   help="meshes (default: %(default)s)")
    p.add_argument("--fp8", default="off", help="off | on | both: model.fp8 per point (default: %(default)s)")
    p.add_argument("--schedules", default="1f1b", help="pipeline schedules for meshes with pipeline > 1, "
                   "comma-separated of gpipe, 1f1b, dualpipe (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="global sequences per micro-batch (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--micro", type=int, default=0, help="micro-batches per step (default 0: 1, or 2 × PP on "
                   "pipeline meshes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="model override for every preset (model.FIELD=VALUE or FIELD=VALUE), after scan_layers=false")
    p.add_argument("--cost-depths", default=None, metavar="K1,K2", help="with --set scan_layers=true on a TPU "
                   "target: XLA's FLOPs and cost-model step time / MFU from two shallow unrolled copies of each "
                   "non-pipelined point (the dense blocks + K1 / K2 MoE layers), extrapolated linearly to the full "
                   "depth (scaling_point.extrapolated_cost); the memory columns stay the full model's")
    p.add_argument("--roofline", action="store_true", help="price the step-time estimate at every chip's peak rates "
                   "instead of the rates its kinds of work achieve (experiments.estimate)")
    p.add_argument("--timed-steps", type=int, default=None, help="real steps to time per point (default: 5 on an "
                   "accelerator, 0 on CPU and compile-only targets, where only 0 is allowed)")
    p.add_argument("--simulate-devices", type=int, default=None, metavar="N", help="XLA:CPU host devices to ask "
                   "for before JAX is imported (default: the largest mesh; 0 leaves XLA_FLAGS alone)")
    p.add_argument("--out", default=os.path.join("bench_results", "scaling"), help="output directory "
                   "(default: %(default)s)")
    return p


def parse_meshes(texts: list[str]) -> list[tuple[tuple[tuple[str, int], ...], str]]:
    """['data=2,expert=4', 'fsdp=8/fsdp'] -> [((('data', 2), ('expert', 4)), 'zero1'), ((('fsdp', 8),), 'fsdp')].

    Syntax only (no JAX import, so that --simulate-devices can still take effect); `resolve` checks the names."""
    meshes = []
    for text in texts:
        default = "fsdp" if "fsdp=" in text and "/" not in text else "zero1"
        try:
            axes, strategy = parse_mesh(text if "/" in text else f"{text}/{default}")
        except SystemExit as e:   # parse_mesh's message quotes the text with the default strategy added
            raise UsageError(str(e).replace(f"{text}/{default}", text)) from None
        if not axes:
            raise UsageError(f"--meshes {text!r}: no axes")
        for name, size in axes.items():
            if size < 1:
                raise UsageError(f"--meshes {text!r}: {name}={size} must be a positive size")
        meshes.append((tuple(axes.items()), strategy))
    return meshes


def resolve(args, meshes) -> tuple[dict, list]:
    """Model configs per preset and the study's points, every argument checked; UsageError names the bad one."""
    from dsv3_jax.config import ConfigError
    from dsv3_jax.config.presets import PRESETS
    from dsv3_jax.train.stages import StageLayout
    from sharding.mesh import MESH_AXES
    from sharding.pipeline_schedules import SCHEDULE_NAMES, ScheduleError, make_schedule
    from sharding.rules import STRATEGIES

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets:
        raise UsageError("--presets: empty")
    for name in presets:
        if name not in PRESETS:
            raise UsageError(f"--presets: {name!r} is not a preset; choose from {', '.join(PRESETS)}")
    if args.fp8 not in FP8_CHOICES:
        raise UsageError(f"--fp8 {args.fp8!r}: choose off, on or both")
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    for name in schedules or [""]:
        if name not in SCHEDULE_NAMES:
            raise UsageError(f"--schedules: {name!r} is not one of {', '.join(SCHEDULE_NAMES)}")
    for flag, value, low in (("--batch", args.batch, 1), ("--seq-len", args.seq_len, 1), ("--micro", args.micro, 0)):
        if value < low:
            raise UsageError(f"{flag}={value}: must be at least {low}")
    depths = None
    if args.cost_depths is not None:
        try:
            depths = tuple(int(k) for k in args.cost_depths.split(","))
        except ValueError:
            depths = ()
        if len(depths) != 2 or not 0 < depths[0] < depths[1]:
            raise UsageError(f"--cost-depths {args.cost_depths!r}: two MoE layer counts K1,K2 with 0 < K1 < K2")
    args.depths = depths
    if args.timed_steps is not None and args.timed_steps < 0:
        raise UsageError(f"--timed-steps={args.timed_steps}: must be at least 0")
    if args.simulate_devices is not None and args.simulate_devices < 0:
        raise UsageError(f"--simulate-devices={args.simulate_devices}: must be at least 0")
    for mesh, strategy in meshes:
        text = ",".join(f"{k}={v}" for k, v in mesh)
        for name, _ in mesh:
            if name not in MESH_AXES:
                raise UsageError(f"--meshes {text!r}: {name!r} is not a mesh axis ({', '.join(MESH_AXES)})")
        if strategy not in STRATEGIES:
            raise UsageError(f"--meshes {text!r}: strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")

    configs = {}
    for name in presets:
        try:
            overrides = [o.removeprefix("model.") for o in args.overrides]
            configs[name] = PRESETS[name].with_overrides(*UNROLLED, *overrides).validate()
        except ConfigError as e:
            raise UsageError(str(e) if str(e).startswith("--set") else f"--set: {e}") from None
        if args.seq_len > configs[name].max_position_embeddings:
            raise UsageError(f"--seq-len={args.seq_len} exceeds {name}'s max_position_embeddings="
                             f"{configs[name].max_position_embeddings}")

    points = []
    for name in presets:
        config = configs[name]
        for mesh, strategy in meshes:
            axes = dict(mesh)
            text = ",".join(f"{k}={v}" for k, v in mesh)
            expert, pp = axes.get("expert", 1), axes.get("pipeline", 1)
            if config.n_routed_experts % expert:
                raise UsageError(f"--meshes {text!r}: expert={expert} does not divide {name}'s "
                                 f"n_routed_experts={config.n_routed_experts}")
            replicas = axes.get("data", 1) * axes.get("fsdp", 1) * expert
            if args.batch % replicas:
                raise UsageError(f"--batch={args.batch}: not divisible by the {replicas} data-parallel ranks of "
                                 f"mesh {text!r}")
            micro = args.micro or (2 * pp if pp > 1 else 1)
            if pp > 1:
                try:
                    StageLayout.balanced(config, pp)
                except ValueError as e:
                    raise UsageError(f"--meshes {text!r}: {e}") from None
                for schedule in schedules:
                    try:
                        make_schedule(schedule, pp, micro)
                    except ScheduleError as e:
                        raise UsageError(f"--schedules / --micro: {e}") from None
            for fp8 in FP8_CHOICES[args.fp8]:
                for schedule in (schedules if pp > 1 else [None]):
                    points.append(Point(name, mesh, strategy, fp8, schedule, micro))
    return configs, points


def bubbles_for(points) -> tuple[list[dict], str]:
    """Simulated bubbles of every schedule at each pipeline point's (PP, M); with no pipeline point, at PP 4, 8, 16
    and M = 2·PP (what a schedule cannot run is left out). Also the plot's title saying which."""
    from experiments.cost_model import schedule_bubble
    from sharding.pipeline_schedules import SCHEDULE_NAMES, ScheduleError

    shapes = list(dict.fromkeys((p.axes["pipeline"], p.micro) for p in points if p.axes.get("pipeline", 1) > 1))
    title = "the study's pipeline meshes"
    if not shapes:
        shapes, title = [(pp, 2 * pp) for pp in (4, 8, 16)], "no pipeline mesh in this study: PP 4, 8, 16, M = 2·PP"
    out = []
    for pp, micro in shapes:
        for name in SCHEDULE_NAMES:
            try:
                out.append(schedule_bubble(name, pp, micro))
            except ScheduleError:
                continue
    return out, title


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


MIB = 2.0 ** 20
_SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
          "collective-permute": "CP", "ragged-all-to-all": "RA2A"}


def _short_collectives(row: dict) -> str | None:
    """'all-gather:39 all-reduce:10' -> 'AG39 AR10' for the table."""
    if row.get("error"):
        return None
    text = row.get("collectives") or ""
    return " ".join(f"{_SHORT[k]}{n}" for k, n in (item.split(":") for item in text.split())) or "none"


def _mib(key):
    return lambda r: None if r.get(key) is None else r[key] / MIB


COLUMNS = [("preset", "preset", "s"), ("mesh", "mesh", "s"), ("strategy", "strategy", "s"),
           ("schedule", lambda r: r["schedule"] or None, "s"), ("fp8", lambda r: "on" if r["fp8"] else "off", "s"),
           ("state MiB", _mib("state_bytes"), ".2f"), ("temp MiB", _mib("temp_size_in_bytes"), ".2f"),
           ("peak MiB", _mib("peak_bytes_per_device"), ".2f"),
           ("XLA GFLOP/dev", lambda r: r.get("xla_flops_per_device") and r["xla_flops_per_device"] / 1e9, ".3f"),
           ("XLA/model", "xla_vs_cost_model", ".3f"), ("collectives", _short_collectives, "s"),
           ("bubble", "bubble_fraction", ".3f"), ("compile s", "compile_s", ".1f"),
           ("est. ms", lambda r: r.get("est_step_s") and 1e3 * r["est_step_s"], ".4g"),
           ("exposed ms", lambda r: r.get("est_step_s") and 1e3 * r["exposed_comm_s"], ".3g"),
           ("est. MFU", "est_mfu", ".1%"),
           ("XLA sum ms", lambda r: r.get("xla_cost_model_step_s") and 1e3 * r["xla_cost_model_step_s"], ".4g"),
           ("XLA MFU", "xla_cost_model_mfu", ".1%"),
           ("step ms", lambda r: r.get("step_s") and 1e3 * r["step_s"], ".2f"),
           ("tokens/s", "tokens_per_s", ",.0f"), ("MFU", "mfu", ".1%")]


def one_line(error: BaseException) -> str:
    """An exception as one line: its type name and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__


def check_target(args, meshes) -> str | None:
    """args.target checked (syntax, and every mesh using all of a compile-only target's devices); None: the devices
    JAX has. Imports sharding.targets, hence JAX: call it after any --simulate-devices has taken effect."""
    if args.target is None:
        return None
    from sharding import targets

    try:
        name = targets.check_name(args.target)
    except targets.TargetError:
        raise UsageError(f"--target {args.target!r}: not a target; accepted: {targets.TARGET_HELP}") from None
    count = targets.device_count(name)
    if count is not None:
        for mesh, _ in meshes:
            size = math.prod(n for _, n in mesh)
            if size != count:
                text = ",".join(f"{k}={v}" for k, v in mesh)
                raise UsageError(f"--meshes {text!r} uses {size} devices but --target {name} has {count}; a "
                                 f"compile-only target's meshes must use all of its devices")
        if args.timed_steps:
            raise UsageError(f"--timed-steps={args.timed_steps}: --target {name} is compile-only; nothing runs there")
    return name


def target_devices(target: str | None) -> list:
    """The devices points compile for; UsageError naming --target when they cannot be described here."""
    import jax

    if target is None:
        return jax.devices()
    from sharding import targets

    try:
        devices = targets.devices(target)
    except targets.TargetError as e:
        raise UsageError(f"--target: {e}") from None
    expected = targets.device_count(target)
    if expected is not None and len(devices) != expected:
        raise UsageError(f"--target {target}: the topology describes {len(devices)} devices, not {expected}")
    return devices


def _describe_target(target: str | None, devices: list) -> str:
    if target is None or target == "cpu":
        from experiments.bench import device_info
        return device_info()["description"] if target is None else f"{len(devices)} host CPU devices"
    return f"compile only for {target}: {len(devices)} × {devices[0].device_kind}"


def main(argv=None) -> int:
    """The study; the exit code.

        python -m experiments.scaling --presets tiny,small --meshes data=8 fsdp=8 data=2,expert=4 \\
            [--target cpu|h100xN|v5p:8x8x8|...] [--fp8 off|on|both] [--schedules gpipe,1f1b,dualpipe] \\
            [--simulate-devices N] [--cost-depths K1,K2] [--out DIR]

    --target: omitted, the devices JAX has (simulated CPU devices on a CPU host, as many as the largest mesh); `cpu`,
    this host's CPU devices; any other sharding.targets name (h100, h100xN, v5e:2x2, v5p:2x2x1, v6e:2x4, ...)
    compiles for compile-only devices of that chip, every mesh using all of them, and never runs a step. The model's
    kernels are what the target's chips would run (dsv3_jax.kernels.resolve, through dsv3_jax.train.build).

    A mesh is `axis=size[,axis=size...][/strategy]` over the axes data, fsdp, expert, pipeline, tensor; the strategy
    (replicated | zero1 | fsdp) defaults to fsdp when the mesh has an fsdp axis, else zero1. Schedules apply to meshes
    with pipeline > 1 (one point per schedule, over --micro micro-batches, default 2 × PP). Layers are compiled
    unrolled (`scan_layers=false`, overridable with --set) so that XLA's cost analysis, which counts a loop body once,
    sees every layer; a pipelined step scans over its schedule's ticks, so there XLA counts one tick (and no
    cost-model MFU is given). A model too deep to compile unrolled compiles scanned (--set scan_layers=true: exact
    memory) with --cost-depths K1,K2, which takes FLOPs and the cost model's step time from two shallow unrolled
    copies, extrapolated to the full depth. The XLA/model column divides XLA's FLOPs by experiments.cost_model's
    executed FLOPs per device.

    Writes DIR/scaling.csv and three plots: memory_by_mesh.png, mfu_by_model_size.png, bubble_by_schedule.png
    (simulated bubble fraction, F = 1, B = 2). A point that fails (e.g. does not fit the chip's memory) is a row with
    its error; the others go on, and the exit code is then 1. Bad arguments: one line naming the argument, exit code
    2, before anything compiles."""
    try:
        args = build_parser().parse_args(argv)
        meshes = parse_meshes(args.meshes)
        largest = max(math.prod(size for _, size in mesh) for mesh, _ in meshes)
        local = args.target in (None, "cpu")
        if local and (args.simulate_devices is None or args.simulate_devices > 0):   # before JAX is imported
            simulate_devices(largest if args.simulate_devices is None else args.simulate_devices)
        target = check_target(args, meshes)
        configs, points = resolve(args, meshes)
        from sharding.targets import target_platform
        if args.depths and (target is None or target_platform(target) != "tpu"):
            raise UsageError(f"--cost-depths: only for a TPU --target (XLA's cost model), not {target or 'local'}")
        devices = target_devices(target)
        if len(devices) < largest:
            raise UsageError(f"--meshes: the largest mesh needs {largest} devices but JAX has {len(devices)} "
                             f"({devices[0].platform}); on a CPU host pass --simulate-devices {largest}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from tqdm import tqdm

    from experiments.cost_model import schedule_bubble
    from experiments.scaling_plots import plot_bubbles, plot_memory, plot_mfu
    from experiments.scaling_point import describe, extrapolated_cost, measure

    compile_only = target not in (None, "cpu")
    timed = 0 if compile_only else (args.timed_steps if args.timed_steps is not None
                                    else (0 if devices[0].platform == "cpu" else 5))
    target_name = target or devices[0].platform
    os.makedirs(args.out, exist_ok=True)

    rows = []
    for point in tqdm(points, desc="scaling", unit="point", dynamic_ncols=True):
        config = configs[point.preset].replace(fp8=point.fp8)
        try:
            row = measure(point, config, devices, args.batch, args.seq_len, timed, target_name, args.roofline)
        except Exception as e:  # noqa: BLE001 - a point that does not compile is a result; the study goes on
            row = dict(describe(point, config, args.batch, args.seq_len, target_name), error=one_line(e))
        if args.depths and point.axes.get("pipeline", 1) == 1:   # also what a point that does not fit would cost
            try:
                row.update(extrapolated_cost(point, config, devices, args.batch, args.seq_len, args.depths,
                                             target_name))
            except Exception as e:  # noqa: BLE001
                row.setdefault("error", one_line(e))
        if point.schedule:
            row["bubble_fraction"] = schedule_bubble(point.schedule, point.axes["pipeline"], point.micro)["fraction"]
        rows.append(row)
    csv_path = os.path.join(args.out, "scaling.csv")
    write_csv(rows, csv_path)
    compiled = [r for r in rows if not r.get("error")]
    bubbles, bubble_title = bubbles_for(points)
    plots = [plot_memory(compiled, args.out), plot_mfu(compiled, args.out),
             plot_bubbles(bubbles, args.out, bubble_title)]
    print(f"scaling: {_describe_target(target, devices)}; batch {args.batch}×{args.seq_len} tokens per micro-batch; "
          f"XLA/model = XLA's FLOPs over experiments.cost_model's executed FLOPs; collectives: static counts in the "
          f"compiled HLO (AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all, CP collective-permute); "
          f"est. ms / exposed ms / est. MFU: estimate (compile-time, experiments.estimate"
          f"{', at peak rates' if args.roofline else ''}): the step with the communication the schedule overlaps "
          f"hidden, and the communication left exposed; XLA sum ms / XLA MFU: XLA's own TPU cost model, a sum over "
          f"operations without overlap (blank where a loop runs more than once: XLA counts its body once)")
    print(format_table(rows, COLUMNS))
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"failed: {r['preset']} {r['mesh']}/{r['strategy']}{'/' + r['schedule'] if r['schedule'] else ''}"
              f"{'/fp8' if r['fp8'] else ''}: {r['error']}")
    print("wrote " + ", ".join([csv_path] + plots))
    return EXIT_POINT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
