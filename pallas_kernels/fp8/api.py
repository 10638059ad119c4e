"""Entry point for block-scaled FP8 matmuls. Implementations by name: the jnp reference, the TPU Pallas kernel and
the Mosaic GPU (Hopper) kernel; both kernels also run in their interpret modes on CPU."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.fp8 import gpu, reference, tpu
from pallas_kernels.fp8.quantize import quantize_1x128, quantize_128x128


IMPLEMENTATIONS = {
    "reference": lambda a_q, a_s, b_q, b_s, out_dtype, interpret: reference.fp8_matmul(a_q, a_s, b_q, b_s, out_dtype),
    "tpu": lambda a_q, a_s, b_q, b_s, out_dtype, interpret: tpu.fp8_matmul(a_q, a_s, b_q, b_s, out_dtype,
                                                                           interpret=interpret),
    "gpu": lambda a_q, a_s, b_q, b_s, out_dtype, interpret: gpu.fp8_matmul(a_q, a_s, b_q, b_s, out_dtype,
                                                                           interpret=interpret),
}


def fp8_matmul(a_q_TC, a_scale_TCb, b_q_CJ, b_scale, *, impl: str = "reference", out_dtype=jnp.bfloat16,
               interpret: bool = False):
    """a_q [T, C] e4m3 with a_scale [T, ceil(C/128)] (1×128 tiles) times b_q [C, J] e4m3 with b_scale
    [ceil(C/128), ceil(J/128)] (128×128 blocks) or [ceil(C/128), J] (128×1 tiles); float32 accumulation
    promoted every 128 of C; result in out_dtype."""
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"fp8_matmul impl={impl!r} unknown; choose one of {sorted(IMPLEMENTATIONS)}") from None
    return fn(a_q_TC, a_scale_TCb, b_q_CJ, b_scale, jnp.dtype(out_dtype), interpret)


def blockwise_matmul(a_TC, b_CJ, *, impl: str = "reference", out_dtype=jnp.bfloat16, interpret: bool = False,
                     power_of_two: bool = False):
    """a · b by the recipe: a quantized per 1×128 tile, b per 128×128 block, then `fp8_matmul`."""
    a_q, a_scale = quantize_1x128(a_TC, power_of_two)
    b_q, b_scale = quantize_128x128(b_CJ, power_of_two)
    return fp8_matmul(a_q, a_scale, b_q, b_scale, impl=impl, out_dtype=out_dtype, interpret=interpret)
