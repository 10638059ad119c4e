"""`python -m experiments.bench moe`: refuses to time without a Hopper GPU; an interpreted dispatch/combine run
checks the GPU kernels (Pallas GPU, interpret mode) against the reference; an interpreted grouped-GEMM run checks
the forward + backward row; tokamax's ragged_dot rows (the optional extra) are built lazily, say when tokamax is not
installed, compute the reference's values (its XLA implementation here) and compile for an H100 (its Mosaic GPU
kernel); bad flags are one line. (The grouped-GEMM and layer sections run the kernels tests/pallas_kernels and
tests/dsv3_jax/model/moe cover.)"""

import json
import sys

import pytest

from experiments.bench import kernels_aot, main, moe

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


def test_interpreted_gemm_rows_check_the_forward_and_backward(tmp_path):
    out = tmp_path / "moe.json"
    result = main(["moe", "--interpret", "--sections", "gemm", "--gemm-shapes", "2x64x128x128", "--out", str(out)],
                  **QUIET)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ours_bf16_rel_err"] < 1e-2 and row["ours_bf16_fwd_bwd_rel_err"] < 2e-2   # y, dx, dW in bf16
    assert "tokamax_bf16_fwd_bwd" not in row and "tokamax_error" not in row   # no interpreter for tokamax's kernels
    assert "forward + backward" in moe.table(result)


def test_tokamax_rows_say_when_it_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)
    fns, error = moe.tokamax_gemm_variants()
    assert fns == {} and kernels_aot.TOKAMAX_MISSING in error
    text = moe.table({"rows": [{"section": "gemm", "shape": "2x64 128->128", "tokamax_error": error}]})
    assert f"tokamax_error: {kernels_aot.TOKAMAX_MISSING}" in text


def _operands(G=4, R=64, K=128, N=256):
    import jax
    import jax.numpy as jnp

    sizes = moe.group_sizes(G, R, 0.3)
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (int(sizes.sum()), K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (G, K, N), jnp.float32) / K ** 0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (x.shape[0], N), jnp.float32).astype(jnp.bfloat16)
    return x, w, jnp.asarray(sizes), dy


def test_tokamax_rows_compute_the_reference():
    """The same functions on tokamax's XLA implementation (this host has no Hopper GPU): y, dx, dW as float32."""
    pytest.importorskip("tokamax")
    fns, error = moe.tokamax_gemm_variants(implementation="xla")
    assert error is None and set(fns) == {"tokamax_ragged_dot_bf16", "tokamax_bf16_fwd_bwd"}
    x, w, gs, dy = _operands()
    want = moe.reference_fwd_bwd(x, w, gs, dy)
    assert moe.max_rel_err(fns["tokamax_ragged_dot_bf16"](x, w, gs), want[0]) < 1e-2
    assert moe.max_rel_err(fns["tokamax_bf16_fwd_bwd"](x, w, gs, dy), want) < 2e-2


def test_tokamax_rows_compile_for_h100():
    pytest.importorskip("tokamax")
    import jax.numpy as jnp

    fns, _ = moe.tokamax_gemm_variants()   # the timed implementation: Mosaic GPU
    M, K, N, G = 256, 128, 256, 4
    bf16 = jnp.bfloat16
    case = kernels_aot.KernelCase("tokamax_bf16_fwd_bwd", "mosaic_gpu", "", fns["tokamax_bf16_fwd_bwd"],
                                  (((M, K), bf16), ((G, K, N), bf16), ((G,), jnp.int32), ((M, N), bf16)),
                                  impl="tokamax", on_target=True)
    r = kernels_aot.compile_case(case, kernels_aot.GPU_TARGET)
    assert r.ok, r.error
    assert r.ptxas_reports >= 1 and r.spill_bytes == 0
