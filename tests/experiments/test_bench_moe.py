"""`python -m experiments.bench moe`: refuses to time without a Hopper GPU; an interpreted dispatch/combine run
checks the GPU kernels (Pallas GPU, interpret mode) against the reference; bad flags are one line.
(The grouped-GEMM and layer sections run the kernels tests/pallas_kernels and tests/dsv3_jax/model/moe cover.)"""

import json

import pytest

from experiments.bench import main

QUIET = {"print_fn": lambda _: None}


def test_refuses_to_time_without_a_hopper_gpu(tmp_path):
    with pytest.raises(SystemExit, match="need a Hopper GPU"):
        main(["moe", "--out", str(tmp_path / "r.json")], **QUIET)


def test_interpreted_dispatch_and_combine_equal_the_reference(tmp_path):
    out = tmp_path / "moe.json"
    main(["moe", "--interpret", "--sections", "dispatch", "--dispatch-shapes", "40x256x3x8",
          "--out", str(out)], **QUIET)
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["dispatch_bf16", "dispatch_fp8_fused", "combine"]
    assert all(r["impl"] == "gpu" and "GBps" not in r for r in rows)
    assert rows[0]["exact"] and rows[2]["rel_err"] < 1e-2     # combine output is bf16


@pytest.mark.parametrize("argv, match", [(["--sections", "gemm,nope"], "--sections"),
                                         (["--gemm-shapes", "3x100x256"], "--gemm-shapes"),
                                         (["--dispatch-shapes", "ax1x2x3"], "--dispatch-shapes")])
def test_bad_flags_are_one_line(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        main(["moe", "--interpret", *argv, "--out", str(tmp_path / "r.json")], **QUIET)
