"""`python -m experiments.bench kernels_aot` at the tiny preset: its rows carry the compilers' numbers (ptxas for the
Mosaic GPU kernel, the TPU cost model's flops), a kernel that fails to compile is a row with a one-line error, and
bad arguments are one-line exits."""

import argparse

import pytest

from experiments.bench import kernels_aot


def _args(**overrides):
    parser = argparse.ArgumentParser()
    kernels_aot.add_arguments(parser)
    args = parser.parse_args([])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_tiny_run_reports_both_compilers():
    result = kernels_aot.run(_args(presets="tiny", tokens=256, kernels="fp8_matmul,combine_rows"))
    rows = result["rows"]
    assert all(r["ok"] for r in rows), [r["error"] for r in rows if not r["ok"]]
    by = {(r["target"], r["kernel"], r["backend"]) for r in rows}
    for target in ("h100", *kernels_aot.TPU_TARGETS):
        assert (target, "fp8_matmul", "reference") in by and (target, "combine_rows", "reference") not in by
    mosaic = [r for r in rows if r["backend"] == "mosaic_gpu"]
    assert mosaic and all(r["spill_bytes"] == 0 and r["registers"] and r["smem_bytes"] for r in mosaic)
    assert any(r["backend"] == "triton" and r["kernel"] == "combine_rows" for r in rows)
    tpu = [r for r in rows if r["backend"] == "pallas_tpu"]
    assert len(tpu) == 3 * 3   # two FP8 GEMM projections and the combine, on each chip
    assert all(r["cost_flops"] >= r["nominal_flops"] for r in tpu)
    text = kernels_aot.table(result)
    assert "mosaic_gpu" in text and "v6e:2x2" in text and "errors:" not in text


def test_a_failed_compile_is_a_row_with_its_reason():
    def broken(x):
        raise ValueError("tile must be a multiple of 8\nmore detail")

    case = kernels_aot.KernelCase("broken", "pallas_tpu", "8x8", broken, (((8, 8), "float32"),))
    r = kernels_aot.compile_case(case, kernels_aot.TPU_TARGETS[0])
    assert not r.ok and r.error == "ValueError: tile must be a multiple of 8"
    row = kernels_aot._row("tiny", kernels_aot.TPU_TARGETS[0], case, r)
    assert "errors:\ntiny v5e:2x2 broken (pallas_tpu): ValueError" in kernels_aot.table({"rows": [row]})


def test_bad_arguments_are_one_line():
    with pytest.raises(SystemExit, match="--platforms"):
        kernels_aot.run(_args(platforms="cpu"))
    with pytest.raises(SystemExit, match="preset"):
        kernels_aot.run(_args(presets="nope", platforms="tpu"))
