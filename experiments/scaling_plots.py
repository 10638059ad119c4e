"""The scaling study's figures, from its rows (the points that compiled): memory per device by mesh, MFU (and FLOPs
per token) by model size, and pipeline bubble by schedule; and for experiments.scaling_real, peak memory against
the chip's HBM and the estimated MFU per point. Each function writes one PNG and returns its path."""

from __future__ import annotations

import os

import numpy as np

MIB = 2.0 ** 20


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(row: dict) -> str:
    label = f"{row['mesh']}/{row['strategy']}"
    if row.get("schedule"):
        label += f"/{row['schedule']}"
    return label + ("/fp8" if row.get("fp8") else "")


def _save(fig, out_dir: str, name: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nothing_compiled(out_dir: str, name: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.text(0.5, 0.5, "no point compiled (see the error column of scaling.csv)", ha="center", va="center")
    ax.set_axis_off()
    return _save(fig, out_dir, name)


def plot_memory(rows: list[dict], out_dir: str) -> str:
    """Per preset, stacked bars per mesh: device 0's parameters and optimizer state (exact), and XLA's temp."""
    if not rows:
        return _nothing_compiled(out_dir, "memory_by_mesh.png")
    plt = _pyplot()
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(max(6, 4 + 1.2 * len(rows)), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        mine = [r for r in rows if r["preset"] == preset]
        x = np.arange(len(mine))
        bottom = np.zeros(len(mine))
        for key, name in (("params_bytes", "parameters"), ("opt_state_bytes", "optimizer state"),
                          ("temp_size_in_bytes", "XLA temp")):
            values = np.array([r.get(key) or 0 for r in mine], float) / MIB
            ax.bar(x, values, bottom=bottom, label=name)
            bottom += values
        ax.set_xticks(x, [_label(r) for r in mine], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("MiB per device"), ax.set_title(preset), ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, out_dir, "memory_by_mesh.png")


def plot_mfu(rows: list[dict], out_dir: str) -> str:
    """Left: MFU against activated parameters, one line per mesh: measured (solid, where the step was timed on an
    accelerator), the step-time estimate's (dash-dot, compile-time, GPU and TPU targets) and XLA's TPU cost model's
    (dashed). Right: FLOPs per token against activated parameters: XLA's count or, where XLA gives none (GPU
    targets), the estimate's (per device × devices / tokens), beside the cost model's executed and model FLOPs."""
    if not rows:
        return _nothing_compiled(out_dir, "mfu_by_model_size.png")
    plt = _pyplot()
    fig, (ax_mfu, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.5))
    shown = False
    for key, style, kind in (("mfu", "o-", "measured"), ("est_mfu", "^-.", "estimate (compile-time)"),
                             ("xla_cost_model_mfu", "s--", "XLA TPU cost model")):
        have = [r for r in rows if r.get(key) is not None]
        for label in dict.fromkeys(_label(r) for r in have):
            mine = sorted((r for r in have if _label(r) == label), key=lambda r: r["params_activated"])
            ax_mfu.plot([r["params_activated"] for r in mine], [100 * r[key] for r in mine], style,
                        label=f"{label} ({kind})")
            shown = True
    if shown:
        ax_mfu.set_xscale("log"), ax_mfu.legend(fontsize=8)
    else:
        ax_mfu.text(0.5, 0.5, "no MFU\n(no accelerator or compile-only chip;\nCPU points have no estimate)",
                    ha="center", va="center", transform=ax_mfu.transAxes)
    ax_mfu.set_xlabel("activated parameters"), ax_mfu.set_ylabel("MFU %"), ax_mfu.grid(alpha=0.3)

    for key, style, kind in (("xla_flops_per_device", "o-", "XLA"), ("est_flops_per_device", "^-.", "estimate")):
        for label in dict.fromkeys(_label(r) for r in rows):
            mine = sorted((r for r in rows if _label(r) == label and r.get(key)
                           and (key == "xla_flops_per_device" or not r.get("xla_flops_per_device"))),
                          key=lambda r: r["params_activated"])
            if mine:
                ax_flops.plot([r["params_activated"] for r in mine],
                              [r[key] * r["devices"] / r["tokens_per_step"] for r in mine], style,
                              label=f"{kind} {label}")
    by_size = sorted({r["params_activated"]: r for r in rows}.values(), key=lambda r: r["params_activated"])
    sizes = [r["params_activated"] for r in by_size]
    ax_flops.plot(sizes, [r["cost_model_flops_per_device"] * r["devices"] / r["tokens_per_step"] for r in by_size],
                  "kx--", label="cost model, executed")
    ax_flops.plot(sizes, [r["model_flops_per_token"] for r in by_size], "k+:", label="cost model, model FLOPs")
    ax_flops.set_xscale("log"), ax_flops.set_yscale("log")
    ax_flops.set_xlabel("activated parameters"), ax_flops.set_ylabel("train FLOPs per token")
    ax_flops.legend(fontsize=7), ax_flops.grid(alpha=0.3)
    return _save(fig, out_dir, "mfu_by_model_size.png")


def plot_bubbles(bubbles: list[dict], out_dir: str, title: str = "") -> str:
    """Bubble fraction (simulated, F = 1, B = 2) by schedule for each (PP, M) in `bubbles`."""
    plt = _pyplot()
    groups = list(dict.fromkeys((b["pp"], b["micro"]) for b in bubbles))
    schedules = list(dict.fromkeys(b["schedule"] for b in bubbles))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) + 2), 4))
    width = 0.8 / max(len(schedules), 1)
    for i, name in enumerate(schedules):
        values = [next((b["fraction"] for b in bubbles if (b["pp"], b["micro"]) == g and b["schedule"] == name),
                       np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, [100 * v for v in values], width, label=name)
    ax.set_xticks(np.arange(len(groups)) + width * (len(schedules) - 1) / 2,
                  [f"PP={pp}, M={m}" for pp, m in groups])
    ax.set_ylabel("bubble % of step (simulated, F=1, B=2)"), ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0)), ax.set_title(title, fontsize=9)
    return _save(fig, out_dir, "bubble_by_schedule.png")


def _target_label(row: dict) -> str:
    parts = [row["target"], row["preset"], row["mesh"]] + ([row["schedule"]] if row.get("schedule") else [])
    return " ".join(parts) + (" fp8" if row.get("fp8") else "")


def plot_memory_vs_hbm(rows: list[dict], out_dir: str) -> str:
    """One bar per point: its compiled peak bytes per device (a failed point: the HBM it asked for, hatched, when
    its error names it), and the chip's HBM as a tick."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    gib = 2.0 ** 30
    for i, row in enumerate(rows):
        peak = row.get("peak_bytes_per_device")
        if peak is not None:
            ax.barh(i, peak / gib, color="tab:blue" if row.get("fits") != "False" else "tab:red")
        else:
            ax.barh(i, 0.5, color="lightgray")
            ax.text(1, i, "did not compile: " + (row.get("error") or "")[:60], va="center", fontsize=6)
        if row.get("device_memory_bytes"):
            ax.plot([row["device_memory_bytes"] / gib] * 2, [i - 0.4, i + 0.4], "k-", lw=2)
    ax.set_yticks(range(len(rows)), [_target_label(r) for r in rows], fontsize=7)
    ax.invert_yaxis(), ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("GiB per device (bar: compiled peak; black tick: the chip's HBM)")
    return _save(fig, out_dir, "memory_vs_hbm.png")


def plot_estimated_mfu(rows: list[dict], out_dir: str, references: dict[str, float]) -> str:
    """Per point (GPU and TPU), the MFU the step-time estimate implies (compile-time) beside XLA's TPU cost model's
    where it gives one, against reference MFUs measured on real clusters (label -> fraction)."""
    plt = _pyplot()
    have = [r for r in rows if r.get("est_mfu") is not None or r.get("xla_cost_model_mfu") is not None]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(have) + 1.8))
    y = range(len(have))
    ax.barh([i - 0.2 for i in y], [100 * (r.get("est_mfu") or 0) for r in have], height=0.4,
            label="estimate (compile-time)")
    ax.barh([i + 0.2 for i in y], [100 * (r.get("xla_cost_model_mfu") or 0) for r in have], height=0.4,
            label="XLA TPU cost model (a sum, no overlap)")
    for (label, value), style in zip(references.items(), ("--", ":", "-.")):
        ax.axvline(100 * value, color="k", ls=style, label=label)
    ax.set_yticks(list(y), [_target_label(r) for r in have], fontsize=7)
    ax.invert_yaxis(), ax.grid(axis="x", alpha=0.3), ax.legend(fontsize=7)
    ax.set_xlabel("MFU % (model FLOPs / estimated step / the chip's BF16 peak)")
    return _save(fig, out_dir, "mfu_estimate.png")
