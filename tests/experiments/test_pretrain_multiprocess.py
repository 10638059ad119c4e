"""The pre-training command as two processes × 4 CPU devices on localhost: per-process data shards, one
metrics log, checkpoints written together."""

import json
import os
import sys

from tests.experiments.cli_helpers import fast_args
from tests.sharding.test_distributed import free_port, run_processes


def test_pretrain_runs_as_two_processes(tmp_path, corpus_dir):
    port = free_port()
    args = fast_args(tmp_path / "run", corpus_dir, tmp_path / "cache", steps=3,
                     extra=("--set", "checkpoint.every=3", "--set", "mesh.expert=2"))
    outputs = run_processes([[sys.executable, "-m", "experiments.pretrain", *args, "--coordinator",
                              f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)] for i in range(2)])
    assert "done: step 3" in outputs[0][0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]          # written once, by process 0
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")
