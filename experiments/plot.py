"""Plot a training run: `python -m experiments.plot WORKDIR` writes loss.png (the losses and the learning rate against
tokens seen) and expert_load.png (each MoE layer's expert loads) there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(records: list[dict], out_path: str) -> None:
    """loss.png: total, next-token and MTP losses (and the learning rate) against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "loss" in r and "event" not in r]
    tokens = np.array([r["tokens"] for r in rows], float)
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("ce", "next-token CE"), ("mtp_loss", "MTP CE")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax_loss.plot(tokens, [np.nan if v is None else v for v in values], label=label)
    for r in records:
        if r.get("event") == "skipped_update":
            ax_loss.axvline(np.interp(r["step"], [x["step"] for x in rows], tokens), color="red", alpha=0.3)
    ax_loss.set_xlabel("tokens"), ax_loss.set_ylabel("loss"), ax_loss.legend(), ax_loss.grid(alpha=0.3)
    ax_lr.plot(tokens, [r["lr"] for r in rows])
    ax_lr.set_xlabel("tokens"), ax_lr.set_ylabel("learning rate"), ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_expert_load(load_records: list[dict], records: list[dict], out_path: str) -> None:
    """expert_load.png: per MoE layer, each expert's share of tokens relative to the mean at the last logged step,
    beside each layer's maximal load violation (max/mean − 1) over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts_LE = np.asarray(load_records[-1]["counts"], float)
    relative_LE = counts_LE / np.maximum(counts_LE.mean(-1, keepdims=True), 1e-9)
    rows = [r for r in records if "expert_load_violation" in r]
    fig, (ax_now, ax_time) = plt.subplots(1, 2, figsize=(12, 4))
    image = ax_now.imshow(relative_LE, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_now.set_xlabel("expert"), ax_now.set_ylabel("MoE layer")
    ax_now.set_title(f"load / mean load at step {load_records[-1]['step']}")
    fig.colorbar(image, ax=ax_now)
    if rows:
        violation_LS = np.asarray([r["expert_load_violation"] for r in rows], float).T
        image = ax_time.imshow(violation_LS, aspect="auto", cmap="magma", interpolation="nearest",
                               extent=(rows[0]["step"], rows[-1]["step"], violation_LS.shape[0] - 0.5, -0.5))
        ax_time.set_xlabel("step"), ax_time.set_ylabel("MoE layer"), ax_time.set_title("max/mean load − 1")
        fig.colorbar(image, ax=ax_time)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    args = parser.parse_args(argv)
    records = read_jsonl(os.path.join(args.workdir, "metrics.jsonl"))
    if not any("loss" in r for r in records):
        print(f"error: {args.workdir}/metrics.jsonl has no logged steps", file=sys.stderr)
        return 2
    written = [os.path.join(args.workdir, "loss.png")]
    plot_losses(records, written[0])
    load_records = read_jsonl(os.path.join(args.workdir, "expert_load.jsonl"))
    if load_records:
        written.append(os.path.join(args.workdir, "expert_load.png"))
        plot_expert_load(load_records, records, written[1])
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
