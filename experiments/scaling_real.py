"""The scaling study on the machines people rent, compile-only (`make scaling-real`): DeepSeek-V3 671B in the V3
report's layout on 2048 H100-class GPUs and on a TPU v5p-1024 slice, and smaller rungs; each rung is one
`experiments.scaling --target ...` run, joined into OUT/scaling_real.csv with two figures.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

from experiments import scaling
from experiments.scaling_plots import plot_estimated_mfu, plot_memory_vs_hbm

V3_BATCH = ("--seq-len", "4096")   # the report's 4K pre-training sequences
# The report's layout: PP16 (DualPipe) × EP64 × ZeRO-1 DP over 2048 GPUs, one 4096-token sequence per data-parallel
# rank per micro-batch, 15360 sequences per step = 120 micro-batches of 128.
RUNGS: dict[str, tuple[str, ...]] = {
    "v3-671b-h100x2048": ("--target", "h100x2048", "--presets", "v3-671b", "--meshes", "pipeline=16,expert=64,data=2",
                          "--schedules", "dualpipe", "--batch", "128", "--micro", "120", "--fp8", "both", *V3_BATCH),
    # fsdp × expert with the layers scanned (the step-time estimate counts the scanned layers as many times as they
    # run; `--cost-depths 1,2` would add XLA's own sum from two shallow unrolled copies, 40 minutes more), and with
    # a pipeline: one sequence per chip.
    "v3-671b-v5p-1024": ("--target", "v5p:8x8x8", "--presets", "v3-671b", "--meshes", "fsdp=8,expert=64",
                         "--batch", "512", "--set", "scan_layers=true", "--set", "remat_policy=full", *V3_BATCH),
    "v3-671b-v5p-1024-pp": ("--target", "v5p:8x8x8", "--presets", "v3-671b", "--meshes", "pipeline=16,expert=32",
                            "--schedules", "1f1b", "--batch", "32", "--micro", "32", *V3_BATCH),
    "v2-lite-h100x8": ("--target", "h100x8", "--presets", "v2-lite-16b", "--meshes", "fsdp=8", "fsdp=2,expert=4",
                       "--batch", "8", "--set", "remat_policy=full", *V3_BATCH),
    "v2-lite-v5e-16": ("--target", "v5e:4x4", "--presets", "v2-lite-16b", "--meshes", "fsdp=16", "fsdp=4,expert=4",
                       "--batch", "16", "--set", "remat_policy=full", *V3_BATCH),
    "v2-lite-v6e-8": ("--target", "v6e:2x4", "--presets", "v2-lite-16b", "--meshes", "fsdp=8", "fsdp=2,expert=4",
                      "--batch", "8", "--set", "remat_policy=full", *V3_BATCH),
    "small-h100": ("--target", "h100", "--presets", "small", "--meshes", "data=1", "--batch", "8", "--seq-len", "2048"),
    "small-v5e": ("--target", "v5e:1", "--presets", "small", "--meshes", "data=1", "--batch", "8", "--seq-len", "2048"),
    "small-v5p": ("--target", "v5p:1", "--presets", "small", "--meshes", "data=1", "--batch", "8", "--seq-len", "2048"),
    "small-v6e": ("--target", "v6e:1", "--presets", "small", "--meshes", "data=1", "--batch", "8", "--seq-len", "2048"),
}
# The committed rows of the last full run (BENCHMARKS.md says when and with what), drawn by scaling.ipynb.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaling_real.csv")
# Measured MFUs the estimate is drawn against: MaxText's DeepSeek-V3 671B on a v5p-1024 slice; DeepSeek's own on 2048
# H800s (180K GPU-hours per trillion tokens at 6 · 37B FLOPs per token: about 35% of the BF16 peak).
MAXTEXT_V5P_MFU = 0.33
DEEPSEEK_H800_MFU = 0.35
REFERENCE_MFUS = {"MaxText, 671B on v5p-1024 (measured)": MAXTEXT_V5P_MFU,
                  "DeepSeek-V3 on 2048 H800s (reported)": DEEPSEEK_H800_MFU}
NUMERIC = ("devices", "micro", "batch", "seq_len", "tokens_per_step", "params_total", "params_activated",
           "state_bytes", "temp_size_in_bytes", "peak_bytes_per_device", "device_memory_bytes", "compile_s",
           "xla_flops_per_device", "xla_cost_model_step_s", "xla_cost_model_mfu", "model_flops_per_token",
           "compute_s", "comm_s", "exposed_comm_s", "est_step_s", "est_mfu", "est_flops_per_device")


def read_rows(path: str) -> list[dict]:
    """scaling.csv rows with the numeric columns as floats (None where empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            if key in row:
                row[key] = float(row[key]) if row[key] not in ("", None) else None
        row["fp8"] = row.get("fp8") == "True"
    return rows


def main(argv=None) -> int:
    """`python -m experiments.scaling_real [--only RUNG[,RUNG...]] [--out DIR]`: DeepSeek-V3 671B on 2048 H100-class
    GPUs and on a TPU v5p-1024 slice (512 chips), and smaller rungs (V2-Lite 16B on 8 H100s, a v5e-16 and a v6e-8;
    `small` on one chip of each). Each rung of RUNGS is one `experiments.scaling --target ...` run into OUT/<rung>/;
    the rows are joined into OUT/scaling_real.csv with two figures: peak memory per device against the chip's HBM
    (memory_vs_hbm.png) and the estimated MFU per point beside XLA's TPU cost model's (mfu_estimate.png).

    The 671B points take 5 to 11 minutes each to compile on a 2-core machine, the whole study about an hour. A rung
    whose points fail (e.g. do not fit) keeps its error rows; the exit code is then 1."""
    p = argparse.ArgumentParser(prog="python -m experiments.scaling_real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(RUNGS), help="comma-separated rungs (default: all)")
    p.add_argument("--out", default=os.path.join("bench_results", "scaling_real"))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNGS]
    if unknown or not names:
        print(f"error: --only {args.only!r}: choose from {', '.join(RUNGS)}", file=sys.stderr)
        return 2
    rows, worst = [], 0
    for name in names:
        out = os.path.join(args.out, name)
        code = scaling.main([*RUNGS[name], "--out", out])
        worst = max(worst, code)
        if os.path.exists(os.path.join(out, "scaling.csv")):
            rows += [dict(r, rung=name) for r in read_rows(os.path.join(out, "scaling.csv"))]
    path = os.path.join(args.out, "scaling_real.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rung", *scaling.CSV_COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plots = [plot_memory_vs_hbm(rows, args.out), plot_estimated_mfu(rows, args.out, REFERENCE_MFUS)]
    print("wrote " + ", ".join([path, *plots]))
    return worst


if __name__ == "__main__":
    sys.exit(main())
