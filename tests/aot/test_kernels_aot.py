"""Every Pallas kernel compiled ahead of time for chips this host lacks (sharding.targets' compile-only devices):
the Mosaic GPU kernels for an H100 without a register spill (ptxas's own report) and within its shared memory,
the Pallas-Triton kernels for an H100, the Pallas TPU kernels for TPU v5e, v5p and v6e with a cost estimate XLA's
cost model sees; the references compile for TPU without the forms it rejects or that unroll per 128 of K.

Shapes are the `small` preset's MoE layer: all of it for the H100 (Mosaic GPU's compile time hardly grows with the
sizes, and ptxas's register allocation depends on them), its widths with 512 tokens for the TPUs (XLA's part of
those programs compiles 4× slower at 16,384), plus the `tiny` preset's sub-tile widths in float32 on one TPU.
"""

from __future__ import annotations

import functools

import pytest

from experiments.bench import kernels_aot as aot

SMALL = aot.preset_shapes("small")
SMALL_512 = aot.preset_shapes("small", tokens=512)
TINY = aot.preset_shapes("tiny")
H100_SMEM_BYTES = 232_448


def _without_repeats(cases):
    """One case per kernel name (the FP8 GEMM's up and down projections compile the same kernel at small)."""
    return list({c.kernel: c for c in reversed(cases)}.values())[::-1]


GPU_CASES = _without_repeats(aot.kernel_cases("gpu", SMALL))
TPU_CASES = _without_repeats(aot.kernel_cases("tpu", SMALL_512))
TINY_TPU_CASES = _without_repeats(aot.kernel_cases("tpu", TINY))


def _ids(cases):
    return [f"{c.kernel}-{c.backend}" for c in cases]


@functools.cache
def _compiled(case: aot.KernelCase, target: str) -> aot.Compiled:
    return aot.compile_case(case, target)


@pytest.mark.parametrize("case", GPU_CASES, ids=_ids(GPU_CASES))
def test_gpu_kernels_compile_for_h100_without_spills(case):
    r = _compiled(case, aot.GPU_TARGET)
    assert r.ok, r.error
    if case.backend != "mosaic_gpu":
        return   # Pallas-Triton: XLA runs ptxas itself and keeps no report; compiling is what is checked
    assert r.ptxas_reports >= 1, "no ptxas report was captured"
    assert r.spill_bytes == 0, f"{case.kernel} spills {r.spill_bytes} bytes (ptxas)"
    assert r.registers is not None and r.registers <= 255
    assert r.smem_bytes is not None and 0 < r.smem_bytes <= H100_SMEM_BYTES


@pytest.mark.parametrize("target", aot.TPU_TARGETS)
@pytest.mark.parametrize("case", TPU_CASES, ids=_ids(TPU_CASES))
def test_tpu_kernels_compile_with_cost_estimates(case, target):
    r = _compiled(case, target)
    assert r.ok, r.error
    if case.flops:   # XLA's flops: the kernel's estimate plus the wrapper's elementwise ops (padding, packing)
        assert r.cost_flops is not None and case.flops <= r.cost_flops <= 3 * case.flops, r.cost_flops


@pytest.mark.parametrize("case", TINY_TPU_CASES, ids=_ids(TINY_TPU_CASES))
def test_tpu_kernels_compile_at_tiny_widths(case):
    """dim 64, moe_intermediate_size 32, float32: widths under a tile are padded by the wrappers."""
    r = _compiled(case, aot.TPU_TARGETS[0])
    assert r.ok, r.error


def test_references_compile_for_tpu_without_unrolling():
    """The bf16 ragged_dot asks for no float32 contract precision (TPU's kernel rejects it), and the FP8 GEMM
    reference is a loop over K blocks: K = 18,432 lowers to one dot, not 144."""
    import jax.numpy as jnp

    down = aot.LayerShapes("v3-down", T=256, D=7168, F=2048, E=8, top_k=2, I=18432)
    fp8_down = [c for c in aot.reference_cases(down) if c.kernel == "fp8_matmul" and c.shapes.startswith("256x18432")]
    assert len(fp8_down) == 1
    text = aot.lower_for(aot.TPU_TARGETS[0], fp8_down[0].fn, fp8_down[0]).as_text()
    assert text.count("stablehlo.dot_general") <= 2
    bf16 = [c for c in aot.reference_cases(SMALL) if c.kernel in ("gmm", "gmm_t") and c.shapes.endswith("bf16")]
    assert len(bf16) == 2 and jnp.dtype(SMALL.dtype) == jnp.bfloat16
    for case in fp8_down + bf16:
        r = _compiled(case, aot.TPU_TARGETS[0])
        assert r.ok, f"{case.kernel}: {r.error}"
