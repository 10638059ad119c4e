"""Helpers for the pre-training CLI tests: arguments of a fast tiny run, and running the CLI."""

import subprocess
import sys

from tests.fast_compile import ROOT, subprocess_env


# Rows per step of a run in this process, whose mesh takes the test session's 8 simulated devices (tests/conftest.py);
# a subprocess has one device and runs fast_args' default of 4.
IN_PROCESS_BATCH = 8


def fast_args(workdir, corpus, cache, steps=12, extra=(), batch=4):
    """A tiny run sized for CI: 2 layers, short rows, frequent checkpoints, no progress bar."""
    return ["--config", "tiny", "--workdir", str(workdir), "--steps", str(steps), "--data", corpus,
            "--set", "model.n_layers=2", "--set", "data.seq_len=32", "--set", f"data.batch_size={batch}",
            "--set", "data.bpe_vocab_size=300", "--set", f"data.cache_dir={cache}",
            "--set", "checkpoint.every=4", "--set", "logging.every=1", "--set", "logging.progress=false",
            "--set", "logging.tensorboard=false", "--set", "schedule.warmup=4", "--set", "schedule.decay=12",
            *extra]


def run_cli(args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "experiments.pretrain", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)
