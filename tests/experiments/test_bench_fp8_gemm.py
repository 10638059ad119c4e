"""`python -m experiments.bench fp8_gemm`: on a CPU host it refuses to time without a Hopper GPU, and with
--interpret it runs our kernel in the GPU interpreter and checks it against the float32 dequantized product."""

import json

import pytest

from experiments.bench import main


def test_refuses_to_time_without_a_hopper_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a Hopper GPU"):
        main(["fp8_gemm", "--shapes", "128x128x128", "--out", str(tmp_path / "r.json")], print_fn=lambda _: None)


def test_interpreted_run_checks_the_kernel(tmp_path):
    out = tmp_path / "fp8_gemm.json"
    lines = []
    main(["fp8_gemm", "--interpret", "--shapes", "130x140x256", "--block", "128x128:m", "--stages", "2",
          "--out", str(out)], print_fn=lines.append)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["M"], row["N"], row["K"], row["tile"]) == (130, 140, 256, "128x128:m/2")
    assert row["rel_err_vs_dequant_f32"] < 8e-3      # bf16 output rounding (2^-8) is the only difference
    assert row["deepgemm_diff"] < 1e-3
    assert "ours_fp8_blockwise" not in row            # interpreter timings are not reported


def test_bad_shapes_and_blocks_are_one_line(tmp_path):
    for argv, match in ((["--shapes", "12x3"], "--shapes"), (["--interpret", "--block", "96x128"], "--block")):
        with pytest.raises(SystemExit, match=match):
            main(["fp8_gemm", *argv, "--out", str(tmp_path / "r.json")], print_fn=lambda _: None)
