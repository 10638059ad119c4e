"""The Mosaic GPU (Hopper) FP8 kernel on CPU: run in JAX's GPU interpreter against the reference on the same FP8
inputs (both warpgroup splits, 128×128 and 128×1 weight scales, unaligned shapes, several tiles per SM so the
persistent loop and the SMEM reuse between tiles are exercised), DeepGEMM's metric against the unquantized
product, and lowering for CUDA at DeepGEMM's benchmark shapes (catches layout / swizzle / WGMMA shape errors
without a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import blockwise_matmul, fp8_matmul, gpu, quantize_1x128, quantize_128x1, quantize_128x128
from tests.pallas_kernels.test_fp8_matmul import deepgemm_diff, operands

SMALL = dict(stages=2, num_sms=2)   # two "SMs": each walks several tiles of the persistent loop


@pytest.mark.parametrize("shape, config, b_tiles", [
    ((200, 256, 300), gpu.TileConfig(block_m=128, block_n=128, **SMALL), "128x128"),
    ((64, 384, 200), gpu.TileConfig(block_m=64, block_n=128, split="n", **SMALL), "128x1"),
])
def test_kernel_matches_reference_on_the_same_fp8_inputs(shape, config, b_tiles):
    M, K, N = shape
    a, b = operands(M, K, N, seed=3)
    a_q, a_s = quantize_1x128(jnp.asarray(a))
    b_q, b_s = (quantize_128x128 if b_tiles == "128x128" else quantize_128x1)(jnp.asarray(b))
    ref = np.asarray(fp8_matmul(a_q, a_s, b_q, b_s, impl="reference", out_dtype=jnp.float32), np.float64)
    ker = np.asarray(gpu.fp8_matmul(a_q, a_s, b_q, b_s, out_dtype=jnp.float32, interpret=True, config=config),
                     np.float64)
    assert ker.shape == (M, N)
    rel = np.max(np.abs(ker - ref)) / np.max(np.abs(ref))
    assert rel < 1e-5, rel


def test_accuracy_against_the_unquantized_product():
    a, b = operands(130, 256, 140, seed=4)
    y = blockwise_matmul(jnp.asarray(a), jnp.asarray(b), impl="gpu", interpret=True)
    assert y.dtype == jnp.bfloat16
    assert deepgemm_diff(y, a.astype(np.float64) @ b) < 1e-3


@pytest.mark.parametrize("M, N, K", [(4096, 7168, 16384), (4096, 2112, 7168), (4096, 24576, 1536),
                                     (128, 7168, 16384), (64, 2112, 7168)])
def test_lowers_for_cuda_at_deepgemm_shapes(M, N, K):
    args = (jax.ShapeDtypeStruct((M, K), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((K // 128, M), jnp.float32),
            jax.ShapeDtypeStruct((N, K), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((K // 128, N), jnp.float32))
    lowered = jax.jit(gpu.fp8_matmul_nt).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_bad_tile_config_is_one_line():
    with pytest.raises(ValueError, match="TileConfig"):
        gpu.TileConfig(block_m=96).check()
