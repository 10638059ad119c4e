"""`python -m experiments.bench kernels_aot` at the tiny preset: its rows carry the compilers' numbers (ptxas for the
Mosaic GPU kernel, the TPU cost model's flops), a kernel that fails to compile is a row with a one-line error, and
bad arguments are one-line exits. tokamax's rows (the optional extra) compile beside ours, or say that it is not
installed."""

import argparse
import sys

import jax.numpy as jnp
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


def test_tokamax_rows_say_when_it_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)   # `import tokamax` raises ImportError
    result = kernels_aot.run(_args(presets="tiny", tokens=256, platforms="gpu", kernels="gmm", references=False))
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["ours"]["ok"] and rows["ours"]["registers"]
    assert not rows["tokamax"]["ok"] and kernels_aot.TOKAMAX_MISSING in rows["tokamax"]["error"]
    text = kernels_aot.table(result)
    assert "absent" in text and "errors:" not in text and "not compiled (1 tokamax rows" in text
    assert not any(r["impl"] == "tokamax" for r in kernels_aot.run(_args(
        presets="tiny", tokens=256, platforms="gpu", kernels="gmm", references=False, tokamax=False))["rows"])


def test_tokamax_rows_compile_beside_ours():
    """tokamax's Mosaic GPU ragged_dot and flash attention (segment mask, k_start) compile for the H100 with ptxas's
    report; its Mosaic TPU ragged_dot compiles with a cost estimate, its TPU attention takes no batched mask."""
    pytest.importorskip("tokamax")
    result = kernels_aot.run(_args(presets="tiny", tokens=256, platforms="gpu", kernels="gmm,mla_attention",
                                   references=False))
    rows = result["rows"]
    assert [(r["kernel"], r["impl"]) for r in rows] == [("gmm", "ours"), ("gmm", "tokamax"), ("mla_attention", "ours"),
                                                        ("mla_attention", "tokamax"), ("mla_attention", "tokamax")]
    assert all(r["ok"] for r in rows), [r["error"] for r in rows if not r["ok"]]
    tokamax = [r for r in rows if r["impl"] == "tokamax"]
    assert all(r["registers"] and r["spill_bytes"] == 0 and r["smem_bytes"] for r in tokamax)
    assert "tokamax" in kernels_aot.table(result)

    shapes = kernels_aot.LayerShapes("t", T=256, D=256, F=128, E=4, top_k=2, I=256, heads=2, qk_nope=64, qk_rope=64,
                                     v_head=128, seq=128)   # widths >= 128 (the TPU kernel's least), 2 rows of 128
    target = kernels_aot.TPU_TARGETS[0]
    gmm = [c for c in kernels_aot.tokamax_grouped_cases("tpu", shapes, jnp.bfloat16) if c.kernel == "gmm"]
    r = kernels_aot.compile_case(gmm[0], target)
    assert r.ok and r.cost_flops >= gmm[0].flops, (r.error, r.cost_flops)
    attention = {c.shapes.split("bf16 ")[1]: kernels_aot.compile_case(c, target)
                 for c in kernels_aot.attention_cases("tpu", shapes) if c.impl == "tokamax"
                 and c.kernel == "mla_attention"}
    assert attention["causal only"].ok, attention["causal only"].error
    assert not attention["segment mask"].ok and "unbatched" in attention["segment mask"].error


def test_a_program_reports_its_kernels_compiled_before():
    fresh = {"registers": 168, "spill_bytes": 0, "smem_bytes": 1024, "setmaxnreg": "232/40", "ptxas_reports": 2}
    cached = {"registers": 200, "spill_bytes": 8, "smem_bytes": 4096, "setmaxnreg": None, "ptxas_reports": 1}
    assert kernels_aot.merge_reports([fresh, cached]) == {"registers": 200, "spill_bytes": 8, "smem_bytes": 4096,
                                                          "setmaxnreg": "232/40", "ptxas_reports": 3}
