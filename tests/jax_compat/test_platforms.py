"""jax_compat.platforms starts only the accelerators a machine has: on a CPU-only machine with the test extras' CUDA
plugin and libtpu installed, nothing is printed; a present GPU whose plugin cannot start gives one warning line and
the CPU; a JAX_PLATFORMS the machine cannot honour is one error line. Each case is a fresh process (JAX starts its
backends once per process), with the environment a user's shell would have."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fast_compile import ROOT

CHOOSE = ("import jax; from jax_compat.platforms import choose_platforms; note = choose_platforms({args}); "
          "print('note:', note); print('platforms:', sorted({{d.platform for d in jax.devices()}}))")


def run(args: str = "", **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-c", CHOOSE.format(args=args)], cwd=ROOT, env={**clean, **env,
                          "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)


def test_a_cpu_machine_starts_the_cpu_silently():
    result = run("gpu=False, tpu=False")
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr[-2000:]
    assert "note: None" in result.stdout and "platforms: ['cpu']" in result.stdout


def test_a_gpu_whose_plugin_cannot_start_is_one_warning_line_and_the_cpu():
    result = run("gpu=True, tpu=False")   # this machine has no GPU: the CUDA plugin cannot start, as if broken
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr[-2000:]
    note = result.stdout.splitlines()[0]
    assert note.startswith("note: warning: this machine has an NVIDIA GPU but JAX cannot use it (")
    assert note.endswith("running on the CPU (set JAX_PLATFORMS=cuda to stop instead)")
    assert "platforms: ['cpu']" in result.stdout


def test_asked_platforms_that_cannot_start_are_one_error_line():
    result = run(JAX_PLATFORMS="cuda")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("jax_compat.platforms.PlatformError: JAX_PLATFORMS=cuda: cannot start ("), last
    assert "Jax plugin configuration error" not in result.stderr


@pytest.mark.parametrize("command", ["experiments.pretrain", "experiments.generate"])
def test_the_commands_say_nothing_about_plugins_on_a_cpu_machine(command, tmp_path):
    """The README's commands, run after `make test` installed the plugins: a bad flag's one error line, nothing
    about CUDA or TPUs."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "XLA_FLAGS")}
    bad = (["--workdir", str(tmp_path), "--set", "model.kernels=fast"] if command == "experiments.pretrain"
           else ["--ckpt", str(tmp_path / "none"), "--prompt", "x", "--max-new-tokens", "4"])
    result = subprocess.run([sys.executable, "-m", command, *bad], cwd=ROOT, env={**clean, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr[-2000:]
