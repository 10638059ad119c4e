"""Benchmarks: programs that print a table and write JSON, each against a named baseline measured in the same run.
`python -m experiments.bench --list` names them; `python -m experiments.bench NAME [--out PATH]
[--simulate-devices N] [options]` runs one.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shlex
import sys
from typing import Any, Callable, Iterable, Sequence

BENCHMARKS = ("sharding_memory", "ep_buffers", "pipeline_bubbles", "fp8_training", "fp8_gemm", "moe", "train_step",
              "decode", "kernels_aot")
DEFAULT_OUT_DIR = "bench_results"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def load(name: str):
    """The module of benchmark `name`."""
    if name not in BENCHMARKS:
        raise SystemExit(f"benchmark {name!r} unknown; choose one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"experiments.bench.{name}")


def simulate_devices(n: int) -> bool:
    """Ask XLA:CPU for `n` host devices if JAX is not imported yet; True if the flag was set.

    An existing device-count flag in XLA_FLAGS is replaced. Once JAX is imported the flag may no longer take
    effect, so it is left alone (the benchmark then runs on the devices JAX has, or says which it lacks). This
    package imports JAX only inside the benchmarks, so `--simulate-devices N` (default: the benchmark's DEVICES)
    takes effect.
    """
    if n <= 0 or "jax" in sys.modules:
        return False
    flags = re.sub(rf"{_DEVICE_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={n}"])
    return True


def device_info(uses_jax: bool = True) -> dict:
    """What the numbers were measured on: the JAX backend and its devices, and the host's cores."""
    info = {"host_cores": os.cpu_count(), "python": platform.python_version()}
    if not uses_jax:
        info["description"] = f"pure Python (no accelerator), host with {os.cpu_count()} cores"
        return info
    import jax

    devices = jax.devices()
    simulated = devices[0].platform == "cpu" and _DEVICE_FLAG in os.environ.get("XLA_FLAGS", "")
    info.update(platform=devices[0].platform, device_kind=devices[0].device_kind, device_count=len(devices),
                simulated=simulated, jax=jax.__version__)
    if devices[0].platform == "cpu":
        info["description"] = (f"CPU, {os.cpu_count()} cores, {len(devices)} "
                               f"{'simulated ' if simulated else ''}XLA devices; JAX {jax.__version__}")
    else:
        info["description"] = f"{len(devices)} × {devices[0].device_kind}; JAX {jax.__version__}"
    return info


def require_devices(n: int) -> list:
    """The first `n` JAX devices, or SystemExit saying how to get them."""
    import jax

    devices = jax.devices()
    if len(devices) < n:
        raise SystemExit(f"this benchmark needs {n} devices but JAX has {len(devices)}; on a CPU host pass "
                         f"--simulate-devices {n} (it must take effect before JAX is imported)")
    return devices[:n]


Column = tuple[str, Any, str]   # (header, row key or function of the row, format spec)


def _cells(rows: Sequence[dict], columns: Iterable[Column]) -> tuple[list[str], list[list[str]]]:
    columns = list(columns)

    def cell(row, get, spec):
        value = get(row) if callable(get) else row.get(get)
        return "-" if value is None else format(value, spec)

    return [h for h, _, _ in columns], [[cell(row, get, spec) for _, get, spec in columns] for row in rows]


def format_table(rows: Sequence[dict], columns: Iterable[Column]) -> str:
    """A right-aligned text table; a cell whose value is None prints as '-'."""
    headers, body = _cells(rows, columns)
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Iterable[Column]) -> str:
    """The same table as GitHub markdown (for BENCHMARKS.md)."""
    headers, body = _cells(rows, columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def _parser(modules: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    sub = parser.add_subparsers(dest="name", metavar="NAME")
    for name, module in modules.items():
        p = sub.add_parser(name, help=module.SUMMARY, description=module.__doc__)
        p.add_argument("--out", default=os.path.join(DEFAULT_OUT_DIR, f"{name}.json"),
                       help="where the JSON goes (default: %(default)s)")
        p.add_argument("--simulate-devices", type=int, default=module.DEVICES, metavar="N",
                       help="host devices to ask XLA:CPU for, before JAX is imported (0: leave XLA_FLAGS alone; "
                            "default: %(default)s)")
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> dict | None:
    """Run the benchmark named in `argv`: print its table, write its JSON, and return the result.

    Each benchmark is a module of this package with NAME, SUMMARY, BASELINE, DEVICES (the XLA devices it wants; 0
    for none; USES_JAX = True marks one that runs JAX on the default devices), add_arguments(parser), run(args) ->
    dict (its `rows` and `baseline`) and table(result) -> str. The JSON goes to `--out` (default
    bench_results/<name>.json) with the date, device and command added."""
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = {name: load(name) for name in BENCHMARKS}
    parser = _parser(modules)
    args = parser.parse_args(argv)
    if args.list:
        for name, module in modules.items():
            print_fn(f"{name:18s} {module.SUMMARY} (baseline: {module.BASELINE})")
        return None
    if args.name is None:
        parser.print_help()
        return None
    module = modules[args.name]
    simulate_devices(args.simulate_devices)
    result = module.run(args)
    result = {"benchmark": args.name, "date": datetime.date.today().isoformat(),
              "command": "python -m experiments.bench " + shlex.join(argv),
              "device": device_info(uses_jax=getattr(module, "USES_JAX", module.DEVICES > 0)), **result}
    print_fn(f"{args.name}: {result['device']['description']}")
    print_fn(module.table(result))
    write_json(result, args.out)
    print_fn(f"wrote {args.out}")
    return result
