"""python -m experiments.scaling: bad arguments stop it with one line and exit code 2 before anything compiles; a
small study of `tiny` (two layers, no MTP) on 8 simulated CPU devices (a subprocess, compile only) writes the CSV and
the three plots, with exact per-device state and XLA's memory and FLOPs; the step timer times a stand-in step."""

import csv
import subprocess
import sys

import pytest

from experiments import scaling
from tests.fast_compile import ROOT, subprocess_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, named", [
    (["--presets", "tiny,huge"], "--presets"),
    (["--meshes", "data=8,foo=2"], "--meshes"),
    (["--meshes", "data=two"], "--meshes"),
    (["--meshes", "data=8/sharded"], "--meshes"),
    (["--meshes", "expert=3"], "--meshes"),
    (["--meshes", "pipeline=4,data=2"], "--meshes"),
    (["--meshes", "pipeline=2,data=4", "--schedules", "dualpipe", "--micro", "3"], "--schedules"),
    (["--schedules", "zigzag"], "--schedules"),
    (["--fp8", "maybe"], "--fp8"),
    (["--meshes", "data=3"], "--batch"),
    (["--seq-len", "100000"], "--seq-len"),
    (["--set", "n_layerz=2"], "--set"),
    (["--timed-steps", "-1"], "--timed-steps"),
    (["--meshes", "data=64", "--batch", "64"], "--meshes"),   # more devices than JAX has
    (["--frobnicate"], "--frobnicate"),
])
def test_bad_arguments_exit_2_with_one_line(argv, named, capsys, tmp_path):
    out = tmp_path / "out"
    code = scaling.main(["--presets", "tiny", "--simulate-devices", "0", "--out", str(out), *argv])   # last one wins
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not out.exists()   # nothing compiled, nothing written


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    proc = subprocess.run([sys.executable, "-m", "experiments.scaling", "--presets", "tiny", "--set", "n_layers=2",
                           "--set", "num_mtp_modules=0", "--meshes", "data=8", "data=2,expert=4", "--batch", "8",
                           "--seq-len", "64", "--out", str(out)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "scaling.csv") as f:
        rows = {row["mesh"]: row for row in csv.DictReader(f)}
    return out, rows, proc


def test_study_writes_csv_plots_and_a_progress_bar(study):
    out, rows, proc = study
    assert set(rows) == {"data=8", "data=2,expert=4"}
    for name in ("memory_by_mesh.png", "mfu_by_model_size.png", "bubble_by_schedule.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "scaling: 100%" in proc.stderr and "8 simulated XLA devices" in proc.stdout


def test_study_rows_hold_compiled_memory_and_flops(study):
    _, rows, _ = study
    dp, ep = rows["data=8"], rows["data=2,expert=4"]
    for row in (dp, ep):
        assert row["strategy"] == "zero1" and int(row["devices"]) == 8 and row["fp8"] == "False"
        assert int(row["alias_size_in_bytes"]) == pytest.approx(int(row["state_bytes"]), rel=1e-3)   # donated
        assert int(row["temp_size_in_bytes"]) > 0 and float(row["xla_flops_per_device"]) > 0
        assert row["step_s"] == row["mfu"] == ""    # CPU: not timed unless --timed-steps asks
    # ZeRO-1 over 8 ranks: AdamW's two moments take a quarter of the parameters' bytes (a few scalars aside)
    assert int(dp["opt_state_bytes"]) == pytest.approx(2 * int(dp["params_bytes"]) / 8, rel=0.02)
    # the expert axis splits the routed experts: fewer parameter bytes per device than pure data parallelism
    assert int(ep["params_bytes"]) < int(dp["params_bytes"])
    assert int(dp["tokens_per_step"]) == 8 * 64


def test_step_timer_times_the_steps_after_a_warm_up():
    import jax
    import jax.numpy as jnp

    from experiments.scaling_point import time_steps

    calls = []

    def step(state, batches, tokens_seen, loss_limit):
        calls.append(1)
        return state + batches["tokens"].sum(), {"loss": jnp.float32(0)}

    init = lambda: jnp.zeros((), jnp.int32)
    result = time_steps(step, init, {"tokens": jnp.ones((1, 2, 4), jnp.int32)}, (jnp.float32(0), jnp.float32(1)),
                        n_steps=3, step_tokens=8, flops_per_token=10.0, n_devices=1, device=jax.devices("cpu")[0])
    assert len(calls) == 4      # one warm-up, three timed
    assert result["step_s"] > 0 and result["tokens_per_s"] == pytest.approx(8 / result["step_s"])
    assert result["mfu"] is None    # no peak FLOP/s known for a CPU
