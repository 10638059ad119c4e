"""Every GPU number still owed, in one command sized for under 10 minutes on one H100/H200 (`make gpu-check`): the
benchmarks of experiments.bench, each against its own baseline, one subprocess each, writing DIR/<check>.json and
.log. Exit code 1 if a check failed or overran its limit, 2 on a bad argument; `--dry-run` prints the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


@dataclasses.dataclass(frozen=True)
class Check:
    """One benchmark run: its name (and JSON / log file stem), the bench's arguments, and a wall-clock limit."""
    name: str
    bench_args: tuple[str, ...]
    limit_s: int


# Sizes chosen so the whole list ends inside 10 minutes: the benches' default shapes (DeepSeek-V3's and `small`'s)
# with fewer timed iterations, and train_step's transformers baseline with its grouped_mm experts only (the eager
# per-expert loop is the slow reference, not the baseline).
CHECKS = (
    Check("fp8_gemm", ("fp8_gemm", "--iters", "10"), 90),
    Check("moe", ("moe", "--iters", "10", "--layer-tokens", "8192"), 120),
    Check("train_step_bf16", ("train_step", "--config", "small", "--steps", "10", "--warmup", "2",
                              "--torch-experts", "grouped_mm"), 120),
    Check("train_step_fp8", ("train_step", "--config", "small", "--set", "model.fp8=true", "--steps", "10",
                             "--warmup", "2", "--torch-experts", "grouped_mm"), 120),
    Check("decode", ("decode", "--config", "small", "--batch", "1,8,64", "--repeats", "2"), 110),
)


def command(check: Check, out_dir: str) -> list[str]:
    """The command line of `check`, writing its JSON into `out_dir`."""
    return [sys.executable, "-m", "experiments.bench", *check.bench_args,
            "--out", os.path.join(out_dir, f"{check.name}.json")]


def run_check(argv: list[str], log_path: str, limit_s: float) -> tuple[str, float]:
    """Run one command, its output into `log_path` and then onto stdout; ('ok' | 'exit N' | 'timeout', seconds).
    A command over its limit is killed with its process group."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            proc.wait(timeout=limit_s)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
    with open(log_path) as log:
        sys.stdout.write(log.read())
    sys.stdout.flush()
    return status, time.perf_counter() - start


def run_all(checks, out_dir: str, run=run_check) -> list[dict]:
    """Every check in turn (a failure does not stop the rest): one result row each."""
    results = []
    for check in checks:
        argv = command(check, out_dir)
        print(f"== {check.name}: {shlex.join(argv)}", flush=True)
        status, seconds = run(argv, os.path.join(out_dir, f"{check.name}.log"), check.limit_s)
        json_path = os.path.join(out_dir, f"{check.name}.json")
        results.append(dict(check=check.name, status=status, seconds=seconds, limit_s=check.limit_s,
                            json=json_path if status == "ok" and os.path.exists(json_path) else None))
    return results


def summary(results: list[dict]) -> str:
    from experiments.bench import format_table

    columns = [("check", "check", "s"), ("status", "status", "s"), ("seconds", "seconds", ".0f"),
               ("limit s", "limit_s", "d"), ("JSON", "json", "s")]
    return format_table(results, columns)


class UsageError(ValueError):
    """A bad command-line argument; the message names it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's own errors as one line, exit code 2
        raise UsageError(message)


def main(argv=None, run=run_check) -> int:
    """`python -m experiments.gpu_check [--out DIR] [--only NAME,...] [--dry-run]`: the CHECKS in turn, fp8_gemm, moe,
    train_step (`small`, BF16 and with model.fp8=true, each against transformers' grouped_mm experts) and decode
    (`small`, batch 1, 8 and 64, against transformers' generate). A check that fails or overruns its time limit is
    reported and the next one runs; a summary table ends the output. Bad arguments: one line naming the argument."""
    parser = _Parser(prog="python -m experiments.gpu_check", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results", help="directory for the JSON and logs (default: "
                        "%(default)s)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(c.name for c in CHECKS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    try:
        args = parser.parse_args(argv)
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {c.name for c in CHECKS}]
        if unknown:
            raise UsageError(f"--only: {unknown[0]!r} is not one of {', '.join(c.name for c in CHECKS)}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    checks = [c for c in CHECKS if not names or c.name in names]

    if args.dry_run:
        for check in checks:
            print(f"{shlex.join(command(check, args.out))}   # {check.name}, limit {check.limit_s} s")
        print(f"total limit {sum(c.limit_s for c in checks)} s")
        return 0
    os.makedirs(args.out, exist_ok=True)
    results = run_all(checks, args.out, run)
    print(f"gpu-check: {sum(r['status'] == 'ok' for r in results)}/{len(results)} ok, results in {args.out}")
    print(summary(results))
    return EXIT_FAILED if any(r["status"] != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
