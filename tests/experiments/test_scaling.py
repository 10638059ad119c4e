"""python -m experiments.scaling: bad arguments (a bad --target included) stop it with one line and exit code 2
before anything compiles; a small study of `tiny` (two layers, no MTP) on 8 simulated CPU devices (a subprocess,
compile only) writes the CSV and the three plots, with exact per-device state and XLA's memory and FLOPs; compiled
for compile-only TPU v5p and H100 targets, it reports per-device memory, collectives and (TPU) the cost model's step
time and MFU, and a point that does not fit the chip's memory is an error row and exit code 1; the step timer times
a stand-in step.

The compile-only points use one dense layer (the cheapest model that exercises the whole step) and the `xla`
attention core: the target-specific kernels have their own ahead-of-time tests."""

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
    (["--cost-depths", "2,1"], "--cost-depths"),
    (["--meshes", "data=64", "--batch", "64"], "--meshes"),   # more devices than JAX has
    (["--frobnicate"], "--frobnicate"),
    (["--target", "v7x:2x2"], "--target"),
    (["--target", "h100x0"], "--target"),
    (["--target", "v5p:2x2x1", "--meshes", "data=2"], "--target"),     # a compile-only mesh uses every device
    (["--target", "v5p:2x2x1", "--meshes", "data=4", "--timed-steps", "2"], "--timed-steps"),   # nothing runs
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
    for row in (dp, ep):
        assert row["target"] == "cpu" and row["error"] == "" and row["xla_cost_model_step_s"] == ""
        assert row["est_step_s"] == row["est_mfu"] == ""   # no chip figures for a CPU: no estimate
        assert int(row["peak_bytes_per_device"]) == _peak(row)
    assert int(ep["n_all_to_all"]) > int(dp["n_all_to_all"])    # expert parallelism exchanges tokens


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


def _peak(row) -> int:
    return sum(sign * int(row[f"{name}_size_in_bytes"]) for sign, name in
               ((1, "argument"), (1, "output"), (-1, "alias"), (1, "temp")))


ONE_DENSE_LAYER = ("--set", "n_layers=1", "--set", "first_k_dense_replace=1", "--set", "num_mtp_modules=0",
                   "--set", "attention_impl=xla")


def _scaling(out, *argv):
    proc = subprocess.run([sys.executable, "-m", "experiments.scaling", *ONE_DENSE_LAYER, "--out", str(out), *argv],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    rows = []
    if (out / "scaling.csv").exists():
        with open(out / "scaling.csv") as f:
            rows = list(csv.DictReader(f))
    return proc, rows


@pytest.fixture(scope="module")
def tpu_study(tmp_path_factory):
    proc, rows = _scaling(tmp_path_factory.mktemp("tpu"), "--target", "v5p:2x2x1", "--presets", "tiny",
                          "--meshes", "data=4", "fsdp=4", "--batch", "8", "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, {row["mesh"]: row for row in rows}


def test_tpu_target_rows_hold_memory_collectives_and_cost_model_mfu(tpu_study):
    proc, rows = tpu_study
    assert set(rows) == {"data=4", "fsdp=4"} and "compile only for v5p:2x2x1: 4 × TPU v5" in proc.stdout
    for row in rows.values():
        assert row["target"] == "v5p:2x2x1" and row["device_kind"] == "TPU v5" and row["error"] == ""
        assert int(row["peak_bytes_per_device"]) == _peak(row) > int(row["state_bytes"])
        assert int(row["alias_size_in_bytes"]) >= int(row["state_bytes"])   # donated (TPU layouts pad small leaves)
        step_s = float(row["xla_cost_model_step_s"])
        model_flops = float(row["model_flops_per_token"]) * int(row["tokens_per_step"])
        assert float(row["xla_cost_model_raw_s"]) + int(row["xla_cost_model_unpriced"]) == pytest.approx(step_s)
        assert step_s > 0 and float(row["xla_cost_model_mfu"]) == pytest.approx(model_flops / (4 * step_s * 459e12))
        assert row["step_s"] == row["mfu"] == ""     # compile-only: nothing timed
        assert row["collectives"] and all(f"{kind}:" in row["collectives"] for kind, column in
                                          (("all-gather", "n_all_gather"), ("all-reduce", "n_all_reduce"))
                                          if int(row[column]))
    # data parallelism all-reduces the gradients; FSDP gathers the parameters and keeps about a quarter of them
    assert int(rows["data=4"]["n_all_reduce"]) > 0 and int(rows["fsdp=4"]["n_all_gather"]) > 0
    assert int(rows["fsdp=4"]["params_bytes"]) < int(rows["data=4"]["params_bytes"]) / 3   # norms stay whole
    for row in rows.values():   # the step-time estimate (compile-time), beside XLA's sum
        est_s, compute_s, exposed_s = (float(row[k]) for k in ("est_step_s", "compute_s", "exposed_comm_s"))
        assert row["est_chip"] == "v5p" and est_s == pytest.approx(compute_s + exposed_s) and compute_s > 0
        assert 0 <= exposed_s <= float(row["comm_s"]) + 1e-12
        model_flops = float(row["model_flops_per_token"]) * int(row["tokens_per_step"])
        assert float(row["est_mfu"]) == pytest.approx(model_flops / (4 * est_s * 459e12))
    assert float(rows["data=4"]["bytes_all_reduce"]) > 0 and float(rows["fsdp=4"]["bytes_all_gather"]) > 0
    assert "est. MFU" in proc.stdout and "estimate (compile-time" in proc.stdout


def test_a_point_that_does_not_fit_is_an_error_row_and_exit_1(tmp_path):
    # An 8M-token vocabulary: `small`'s embedding and head (dim 1024) with gradients and ZeRO-1 moments need more
    # than a v5p's HBM, `tiny`'s (dim 64) fit; the failing point comes first and the study goes on.
    proc, rows = _scaling(tmp_path, "--target", "v5p:2x2x1", "--presets", "small,tiny", "--set",
                          "vocab_size=8000000", "--meshes", "data=4", "--batch", "4", "--seq-len", "8")
    assert proc.returncode == 1, proc.stderr[-3000:]
    small, tiny = rows
    assert small["preset"] == "small" and "RESOURCE_EXHAUSTED" in small["error"] and "\n" not in small["error"]
    assert small["error"].split(":")[0].endswith("Error") and small["peak_bytes_per_device"] == ""
    assert tiny["error"] == "" and int(tiny["peak_bytes_per_device"]) == _peak(tiny)
    assert f"failed: small data=4/zero1: {small['error']}" in proc.stdout


def test_h100_target_point_compiles(tmp_path):
    proc, rows = _scaling(tmp_path, "--target", "h100x4", "--presets", "tiny", "--meshes", "data=4", "--batch", "8",
                          "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rows
    assert row["device_kind"] == "NVIDIA H100 80GB HBM3" and row["error"] == "" and int(row["devices"]) == 4
    assert int(row["peak_bytes_per_device"]) == _peak(row) > 0
    assert int(row["device_memory_bytes"]) == 80 * 2**30 and row["fits"] == "True"
    assert int(row["n_all_reduce"]) + int(row["n_reduce_scatter"]) > 0       # the gradients are reduced
    assert row["xla_cost_model_step_s"] == ""        # XLA's cost model is TPU-only
    assert row["est_chip"] == "h100" and float(row["est_step_s"]) > 0 and 0 < float(row["est_mfu"]) <= 1
    assert float(row["bytes_all_reduce"]) + float(row["bytes_reduce_scatter"]) > 0


def test_tpu_cost_model_takes_out_the_calls_it_prices_at_minus_one_second():
    import types

    from experiments.scaling_point import tpu_cost_model

    tpu, gpu = (types.SimpleNamespace(platform=p, device_kind=k) for p, k in (("tpu", "TPU v5"), ("gpu", "H100")))
    row = dict(model_flops_per_token=6e6, tokens_per_step=1024, devices=4)
    calls = {"PrepareAsyncCallStart": 8, "PrepareAsyncCallDone": 8, "tpu_custom_call": 39}
    out = tpu_cost_model({"optimal_seconds": -15.999}, calls, row, False, tpu)
    assert out["xla_cost_model_raw_s"] == -15.999 and out["xla_cost_model_unpriced"] == 16
    assert out["xla_cost_model_step_s"] == pytest.approx(0.001)
    assert out["xla_cost_model_mfu"] == pytest.approx(6e6 * 1024 / (4 * 0.001 * 459e12))
    assert tpu_cost_model({"optimal_seconds": 0.001}, calls, row, True, tpu)["xla_cost_model_mfu"] is None   # one tick
    assert tpu_cost_model({"optimal_seconds": -3.0}, {}, row, False, tpu)["xla_cost_model_step_s"] is None
    scanned = types.SimpleNamespace(repeated_loops=("while.3 (scan) x3",), flops=3e9, xla_flops=1.1e9)
    assert tpu_cost_model({"optimal_seconds": -15.999}, calls, row, False, tpu, scanned)["xla_cost_model_mfu"] is None
    chunked = types.SimpleNamespace(repeated_loops=("while.9 (loss chunks) x4",), flops=3e9, xla_flops=3.2e9)
    assert tpu_cost_model({"optimal_seconds": -15.999}, calls, row, False, tpu, chunked)["xla_cost_model_mfu"]
    assert tpu_cost_model({"optimal_seconds": 1e-9}, {}, row, False, tpu)["xla_cost_model_mfu"] is None   # > 100%
    assert set(tpu_cost_model({"optimal_seconds": 0.001}, {}, row, False, gpu).values()) == {None}


def test_cost_depths_extrapolate_a_scanned_model_to_its_unrolled_cost(tmp_path):
    # 1 dense + 3 MoE layers on a v5p slice: compiled unrolled, XLA's cost analysis sees every layer; compiled
    # scanned it counts one, and --cost-depths 1,2 must recover the unrolled FLOPs and cost-model time from two
    # shallow copies. Memory stays the scanned compile's own.
    common = ("--target", "v5p:2x2x1", "--presets", "tiny", "--set", "n_layers=4", "--set", "num_mtp_modules=0",
              "--set", "attention_impl=xla", "--meshes", "data=4", "--batch", "8", "--seq-len", "64")
    run = lambda out, *argv: subprocess.run([sys.executable, "-m", "experiments.scaling", *common, "--out",
                                             str(out), *argv], cwd=ROOT, env=subprocess_env(), capture_output=True,
                                            text=True, timeout=300)
    unrolled, scanned = run(tmp_path / "u"), run(tmp_path / "s", "--set", "scan_layers=true", "--cost-depths", "1,2")
    assert unrolled.returncode == scanned.returncode == 0, (unrolled.stderr + scanned.stderr)[-3000:]
    (full,), (extrapolated,) = (list(csv.DictReader(open(tmp_path / d / "scaling.csv"))) for d in "us")
    assert full["cost_depths"] == "" and extrapolated["cost_depths"] == "1,2"
    assert float(extrapolated["cost_compile_s"]) > 0
    flops = float(full["xla_flops_per_device"])
    assert float(extrapolated["xla_flops_per_device"]) == pytest.approx(flops, rel=0.02)
    step_s = float(full["xla_cost_model_step_s"])
    assert float(extrapolated["xla_cost_model_step_s"]) == pytest.approx(step_s, rel=0.1)
    assert float(extrapolated["xla_cost_model_mfu"]) == pytest.approx(float(full["xla_cost_model_mfu"]), rel=0.1)
    assert int(extrapolated["peak_bytes_per_device"]) == _peak(extrapolated)
    # The estimate prices the scanned step whole (its loop counted as many times as it runs): close to the unrolled
    # one's (the scan's carried copies and unfused layer boundaries cost a little more).
    assert float(extrapolated["est_step_s"]) == pytest.approx(float(full["est_step_s"]), rel=0.25)
    assert float(extrapolated["est_flops_per_device"]) == pytest.approx(float(full["est_flops_per_device"]), rel=0.02)


def test_cost_depths_needs_a_tpu_target(capsys, tmp_path):
    code = scaling.main(["--presets", "tiny", "--simulate-devices", "0", "--target", "h100x4", "--meshes", "data=4",
                         "--cost-depths", "1,2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cost-depths" in err[0], err
