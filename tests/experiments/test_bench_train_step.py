"""The train_step benchmark on a CPU: one run of a shrunken tiny preset (ours with packed documents, transformers'
eager-experts variant beside it, a bad variant that must leave an error in its row, a one-step profile), in a
subprocess with XLA's cheapest compile settings; and the trace summary on a synthetic GPU trace."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.bench import BENCHMARKS
from experiments.bench.train_step import make_batch, resolve, summarize_trace
from tests.fast_compile import ROOT, subprocess_env

ARGS = ["--config", "tiny", "--set", "model.n_layers=2", "--set", "model.vocab_size=512", "--batch", "2",
        "--seq-len", "32", "--steps", "2", "--warmup", "1", "--docs-per-row", "2", "--torch-experts", "eager,bogus",
        "--profile-steps", "1"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_step")
    argv = ["train_step", *ARGS, "--out", str(d / "out.json"), "--profile", str(d / "profile")]
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", *argv], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(d / "out.json") as f:
        return json.load(f), proc.stdout, d


def test_ours_and_transformers_side_by_side(bench_run):
    from dsv3_jax.model.counting import train_flops_per_token

    data, printed, _ = bench_run
    assert "train_step" in BENCHMARKS and data["benchmark"] == "train_step"
    ours, eager, bogus = data["rows"]
    model = resolve(_Args()).model
    tokens = 2 * 32
    assert ours["impl"] == "ours (jax)" and "error" not in ours, ours.get("error")
    assert ours["state_donated"] and ours["donated_bytes"] == ours["state_bytes"]   # the pre-training jit donates
    assert ours["peak_bytes"] >= ours["state_bytes"] and ours["peak_source"] == "memory_analysis"
    assert ours["flops_per_token"] == train_flops_per_token(model, 32)
    assert ours["packed_docs"] == 2 and ours["attention_impl"] == "xla"
    # Random tokens: cross-entropy near ln(vocab) after a few small updates.
    assert abs(ours["ce"] - math.log(512)) < 0.5 and ours["loss"] > ours["ce"]   # + MTP and balance terms
    assert eager["impl"] == "transformers eager" and "error" not in eager, eager.get("error")
    assert eager["experts_impl_used"] == "eager"
    assert eager["flops_per_token"] == train_flops_per_token(model.replace(num_mtp_modules=0), 32)
    assert abs(eager["loss"] - math.log(512)) < 0.5
    for row in (ours, eager):
        assert row["tokens_per_s"] == pytest.approx(tokens / row["step_s"])
        assert row["step_min_s"] <= row["step_s"] <= row["step_max_s"]
        assert row["mfu"] is None and row["vs_baseline"] is None   # a CPU has no known peak; no grouped_mm row
    assert bogus["impl"] == "transformers bogus" and "bogus" in bogus["error"] and "tokens_per_s" not in bogus
    assert "ours (jax)" in printed and "transformers eager" in printed


def test_profile_writes_a_flat_trace_and_its_summary(bench_run):
    data, _, d = bench_run
    profile = data["rows"][0]["profile"]
    assert profile["trace"] == str(d / "profile" / "jax_trace.json.gz") and os.path.getsize(profile["trace"]) > 0
    assert os.path.getsize(d / "profile" / "jax.xplane.pb") > 0
    assert profile["steps"] == 1 and not profile["device_trace"] and profile["threads"]


class _Args:
    config, overrides, batch, seq_len, steps, warmup, docs_per_row, profile_steps = \
        "tiny", ["model.n_layers=2", "model.vocab_size=512"], 8, 32, 2, 1, 2, 1   # 8 rows: the session's 8 devices


def test_packed_batch_restarts_positions_per_document():
    batch = make_batch(resolve(_Args()), docs_per_row=3)
    assert batch["tokens"].shape == (1, 8, 32) and batch["tokens"].max() < 512
    segments, positions = batch["segment_ids"][0, 0], batch["positions"][0, 0]
    np.testing.assert_array_equal(segments, np.arange(32) // 11)
    np.testing.assert_array_equal(positions, np.arange(32) - 11 * segments)


def test_trace_summary_reads_device_threads_per_step():
    meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}
    op = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur}
    events = [meta(1, None, "process_name", "/host:CPU"), meta(2, None, "process_name", "/device:GPU:0"),
              meta(2, 7, "thread_name", "Stream #1(Compute)"), meta(2, 8, "thread_name", "XLA Ops"),
              op(1, 1, "host work", 9e6), op(2, 7, "gemm", 3000), op(2, 7, "gemm", 1000), op(2, 7, "flash_fwd", 2000),
              op(2, 8, "fusion.1", 4000)]
    s = summarize_trace(events, steps=2)
    assert s["device_trace"] and set(s["threads"]) == {"/device:GPU:0 / Stream #1(Compute)", "/device:GPU:0 / XLA Ops"}
    stream = s["threads"]["/device:GPU:0 / Stream #1(Compute)"]
    assert stream["busy_ms_per_step"] == pytest.approx(3.0)
    assert stream["top_ops"] == [["gemm", pytest.approx(2.0), 1.0], ["flash_fwd", pytest.approx(1.0), 0.5]]
