"""kill -9 at an arbitrary moment, re-run the same command: the loss curve and the final state equal
an uninterrupted run's, bitwise (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.experiments.cli_helpers import ROOT, fast_args, run_cli
from tests.fast_compile import subprocess_env

STEPS = 14


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def final_state(workdir):
    directory = os.path.join(workdir, "checkpoints")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             data=ocp.args.JsonRestore()))
    manager.close()
    return step, restored["state"], restored["data"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus_dir):
    """(workdir, BPE cache) of an uninterrupted run."""
    root = tmp_path_factory.mktemp("straight")
    result = run_cli(fast_args(root / "run", corpus_dir, root / "cache", STEPS))
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run", root / "cache"


def interrupt_after(workdir, corpus_dir, cache, step, signum, stdout=subprocess.DEVNULL):
    """Start the run, send `signum` once `step` is logged; returns the finished process."""
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "experiments.pretrain",
                             *fast_args(workdir, corpus_dir, cache, STEPS)],
                            cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(workdir / "metrics.jsonl") and max(losses(workdir), default=0) >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signum)
    proc.wait(timeout=120)
    return proc


def assert_resumes_to_the_straight_run(workdir, corpus_dir, straight):
    resumed = run_cli(fast_args(workdir, corpus_dir, straight[1], STEPS))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    expected, got = losses(straight[0]), losses(workdir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert got == expected  # bitwise: the floats were written with repr

    step_a, state_a, data_a = final_state(straight[0])
    step_b, state_b, data_b = final_state(workdir)
    assert step_a == step_b == STEPS
    assert data_a == data_b
    leaves_a, tree_a = jax.tree.flatten(state_a)
    leaves_b, tree_b = jax.tree.flatten(state_b)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kill9_then_resume_equals_uninterrupted(tmp_path, corpus_dir, straight):
    # Killed just after step 9 is logged: checkpoint 8 may still be in flight, and steps 9+ are lost.
    workdir = tmp_path / "killed"
    interrupt_after(workdir, corpus_dir, straight[1], 9, signal.SIGKILL)
    assert max(losses(workdir)) < STEPS
    assert_resumes_to_the_straight_run(workdir, corpus_dir, straight)


def test_sigterm_saves_the_current_step_then_resume_equals_uninterrupted(tmp_path, corpus_dir, straight):
    workdir = tmp_path / "terminated"
    proc = interrupt_after(workdir, corpus_dir, straight[1], 5, signal.SIGTERM, stdout=subprocess.PIPE)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped_at = max(losses(workdir))
    assert f"checkpoint saved at step {stopped_at}" in proc.stdout.read()
    assert final_state(workdir)[0] == stopped_at       # the step it stopped at, not only the last multiple of 4
    assert_resumes_to_the_straight_run(workdir, corpus_dir, straight)
