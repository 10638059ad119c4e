"""The analytic cost model: its small-preset numbers against the AOT-compiled train step of `tiny` (XLA's FLOPs and
memory, through experiments.scaling on one device), and its V3 numbers against the report's."""

import csv
import dataclasses
import subprocess
import sys

import pytest

from dsv3_jax.model.counting import count_params
from dsv3_jax.config.presets import get_preset
from experiments import cost_model
from experiments.cost_model import Cluster, Recipe
from tests.fast_compile import ROOT, subprocess_env

FLOPS_TOLERANCE = 0.10    # XLA counts elementwise work (softmax, norms, masks, AdamW) on top of the matmuls
BYTES_TOLERANCE = 0.001   # the compiled arguments hold the state plus the batch and a few scalars
SEQ_LEN, BATCH = 128, 8


@pytest.fixture(scope="module")
def tiny_compiled(tmp_path_factory):
    """experiments.scaling's row for `tiny` (unrolled layers) compiled for a single device."""
    out = tmp_path_factory.mktemp("scaling_tiny")
    proc = subprocess.run([sys.executable, "-m", "experiments.scaling", "--presets", "tiny", "--meshes", "data=1",
                           "--seq-len", str(SEQ_LEN), "--batch", str(BATCH), "--simulate-devices", "0",
                           "--timed-steps", "0", "--out", str(out)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "scaling.csv") as f:
        (row,) = list(csv.DictReader(f))
    return row


def test_tiny_flops_match_xla_cost_analysis(tiny_compiled):
    config = get_preset("tiny").replace(scan_layers=False)
    tokens = BATCH * SEQ_LEN
    xla = float(tiny_compiled["xla_flops_per_device"])
    executed = cost_model.executed_flops_per_token(config, SEQ_LEN) * tokens
    assert float(tiny_compiled["cost_model_flops_per_device"]) == pytest.approx(executed)
    # The model counts matmuls only, so XLA's count is at least it and at most FLOPS_TOLERANCE above.
    assert 1.0 <= xla / executed <= 1 + FLOPS_TOLERANCE, xla / executed
    # The useful (MFU) count leaves out the masked half of attention and the unchosen experts' products.
    assert cost_model.model_flops_per_token(config, SEQ_LEN) * tokens < 0.75 * executed


def test_tiny_state_bytes_match_compiled_arguments(tiny_compiled):
    config = get_preset("tiny")
    state = cost_model.train_state_bytes(config)
    assert int(tiny_compiled["params_bytes"]) == state["params_bytes"]
    assert int(tiny_compiled["moe_bias_bytes"]) == state["moe_bias_bytes"]
    assert int(tiny_compiled["opt_state_bytes"]) == pytest.approx(state["opt_state_bytes"], rel=BYTES_TOLERANCE)
    batch_bytes = 4 * BATCH * SEQ_LEN
    arguments = int(tiny_compiled["argument_size_in_bytes"]) - batch_bytes
    assert arguments == pytest.approx(state["state_bytes"], rel=BYTES_TOLERANCE)
    assert int(tiny_compiled["alias_size_in_bytes"]) == pytest.approx(state["state_bytes"], rel=BYTES_TOLERANCE)


@pytest.fixture(scope="module")
def v3_report():
    return cost_model.run_report(get_preset("v3-671b"), Cluster(), Recipe())


def test_v3_gpu_hours_against_the_report(v3_report):
    r = v3_report
    counts = count_params(get_preset("v3-671b"))
    # more than 6 × the 37B activated parameters (MTP and attention come on top), by less than a quarter
    assert 6 * counts.activated < r["flops_per_token"] < 1.25 * 6 * counts.activated
    assert r["mfu"] == r["implied_mfu"] and 0 < r["implied_mfu"] < 1
    assert r["gpu_hours_per_trillion"] == pytest.approx(cost_model.REPORT_GPU_HOURS_PER_TRILLION)
    assert r["pretrain_gpu_hours"] == pytest.approx(cost_model.REPORT_PRETRAIN_GPU_HOURS, rel=1e-3)
    assert r["total_gpu_hours"] == pytest.approx(cost_model.REPORT_TOTAL_GPU_HOURS, rel=0.03)
    slower = cost_model.run_report(get_preset("v3-671b"), Cluster(), Recipe(), mfu=r["implied_mfu"] / 2)
    assert slower["gpu_hours_per_trillion"] == pytest.approx(2 * r["gpu_hours_per_trillion"])


def test_v3_memory_fits_an_h800_and_dualpipe_holds_twice_the_parameters(v3_report):
    worst = v3_report["worst_device"]
    assert worst["total_bytes"] < Cluster().hbm_bytes     # the report trained it without tensor parallelism
    assert [m["in_flight"] for m in v3_report["memory"]] == [Cluster().pp + 1] * Cluster().pp
    one_f_one_b = cost_model.run_report(get_preset("v3-671b"), Cluster(), Recipe(schedule="1f1b"))
    assert [m["in_flight"] for m in one_f_one_b["memory"]] == list(range(Cluster().pp, 0, -1))
    assert sum(m["params"] for m in v3_report["memory"]) == pytest.approx(
        2 * sum(m["params"] for m in one_f_one_b["memory"]))
    fp8 = cost_model.run_report(get_preset("v3-671b"), Cluster(), Recipe(weights="fp8"))
    middle = Cluster().pp // 2      # holds no embedding or head, which stay BF16: every weight is an FP8 GEMM weight
    ratio = fp8["memory"][middle]["weights_bytes"] / v3_report["memory"][middle]["weights_bytes"]
    assert ratio == pytest.approx((1 + 4 / 128 ** 2) / 2)
    assert fp8["memory"][0]["weights_bytes"] / v3_report["memory"][0]["weights_bytes"] > ratio


def test_v3_bubble_and_all_to_all(v3_report):
    b = v3_report["bubble"]
    assert b["simulated"] == b["formula"] == (Cluster().pp // 2 - 1) * (1 + 2 + 2)   # (PP/2−1)(F&B+B), W = 0
    one_f_one_b = cost_model.pipeline_bubble(Cluster(), dataclasses.replace(Recipe(), schedule="1f1b"))
    assert one_f_one_b["simulated"] == (Cluster().pp - 1) * 3 and b["fraction"] < one_f_one_b["fraction"]
    a = v3_report["all_to_all"]
    # node-limited: RDMA carries one copy per node (4), NVLink one per expert (8)
    assert a["forward"]["dispatch_nvlink"] == 2 * a["forward"]["dispatch_rdma"]
    assert a["forward"]["combine_rdma"] > a["forward"]["dispatch_rdma"]          # BF16 against FP8 rows
    wider = cost_model.all_to_all_bytes_per_token(get_preset("v3-671b"), Recipe(max_nodes=8))
    assert wider["forward"]["dispatch_rdma"] == 2 * a["forward"]["dispatch_rdma"]
    assert v3_report["rdma_to_compute"] < 1   # DualPipe can hide the all-to-all behind the computation


def test_cli_prints_the_report_and_rejects_bad_flags(capsys):
    assert cost_model.main([]) == 0
    printed = capsys.readouterr().out
    assert "implied MFU" in printed and "worst device" in printed
    assert cost_model.main(["--mfu", "1.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --mfu=1.5: must be in (0, 1]"]
    assert cost_model.main(["--pp", "7"]) == 2
    assert "pp=7" in capsys.readouterr().err
