"""Where a run's record goes: `run_config.json` (the whole run config and the kernels resolved for it), `metrics.jsonl`
(one line per logged step), TensorBoard event files, and `expert_load.jsonl` (per-layer, per-expert token counts)."""

from __future__ import annotations

import dataclasses
import json
import os


class MetricsLog:
    def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.load_path = os.path.join(workdir, "expert_load.jsonl")
        self.writer = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def write_run_config(self, run, kernels, compiler_options: dict) -> None:
        """`run_config.json`: every field of `run` (a RunConfig), the resolved KernelSet and the XLA options the step
        compiles with; rewritten at every start, so it describes the latest one."""
        if not self.enabled:
            return
        record = {**dataclasses.asdict(run), "kernels": kernels.describe(), "compiler_options": compiler_options}
        path = os.path.join(os.path.dirname(self.metrics_path), "run_config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`: a resumed run rewrites them (they follow the restored state)."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.load_path):
            if not os.path.exists(path):
                continue
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)

    def write(self, record: dict, expert_counts_LE=None) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if expert_counts_LE is not None:
            with open(self.load_path, "a") as f:
                f.write(json.dumps({"step": record["step"], "counts": expert_counts_LE}) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
                elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/layer_{i}", v, record["step"])

    def event(self, record: dict) -> None:
        """A non-metric line (a skipped update, a stop) in metrics.jsonl."""
        if self.enabled:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
