"""y = x · W with FP8 operands in all three GEMMs (DeepSeek-V3's FP8 training recipe), as a `custom_vjp`: block-scaled
E4M3 tiles, float32 accumulation promoted every 128 of the contraction (`pallas_kernels.fp8`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fp8 import fp8_matmul, quantize_1x128, quantize_128x1, quantize_128x128
from sharding.per_shard import on_batch_shards


class _Options(NamedTuple):   # static (hashable) settings of one call
    impl: str
    power_of_two: bool
    interpret: bool
    out_dtype: jnp.dtype
    x_dtype: jnp.dtype
    w_dtype: jnp.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul_2d(x_TC, w_CJ, o: _Options):
    return _forward(x_TC, w_CJ, o)[0]


def _forward(x_TC, w_CJ, o: _Options):
    x_q, x_scale = quantize_1x128(x_TC, o.power_of_two)
    w_q, w_scale = quantize_128x128(w_CJ, o.power_of_two)
    y_TJ = fp8_matmul(x_q, x_scale, w_q, w_scale, impl=o.impl, out_dtype=o.out_dtype, interpret=o.interpret)
    xt_q_CT, xt_scale_CTb = quantize_1x128(x_TC.T, o.power_of_two)     # x in 128×1 tiles, for the weight gradient
    return y_TJ, (xt_q_CT, xt_scale_CTb, w_q, w_scale)


def _backward(o: _Options, residuals, dy_TJ):
    xt_q_CT, xt_scale_CTb, w_q_CJ, w_scale_CbJb = residuals
    dy_q, dy_scale_TJb = quantize_1x128(dy_TJ, o.power_of_two)
    dx_TC = fp8_matmul(dy_q, dy_scale_TJb, w_q_CJ.T, w_scale_CbJb.T, impl=o.impl, out_dtype=o.x_dtype,
                       interpret=o.interpret)
    dy_q_cols, dy_scale_TbJ = quantize_128x1(dy_TJ, o.power_of_two)
    dw_CJ = fp8_matmul(xt_q_CT, xt_scale_CTb, dy_q_cols, dy_scale_TbJ, impl=o.impl, out_dtype=o.w_dtype,
                       interpret=o.interpret)
    return dx_TC, dw_CJ


_fp8_matmul_2d.defvjp(_forward, _backward)


def fp8_linear(x_XC, w_CJ, *, out_dtype=None, power_of_two: bool = False, impl: str = "reference",
               interpret: bool = False):
    """x [..., C] · w [C, J] -> [..., J] in out_dtype (default x.dtype); gradients in x's and w's dtypes.

    `impl` names the `pallas_kernels.fp8` kernel (dsv3_jax.kernels chooses it for the model's layers).

    Forward  y  = x · W      x in 1×128 tiles, W in 128×128 blocks
    Data     dx = dy · Wᵀ    dy in 1×128 tiles, Wᵀ reuses the forward's blocks (transposed)
    Weight   dW = xᵀ · dy    x and dy in 128×1 tiles (128 tokens per scale), x saved as FP8 by the forward
    Every product accumulates in float32 with promotion every 128 of the contraction. The Pallas kernels are custom
    calls XLA cannot partition: on a sharded mesh they run once per batch shard (sharding.per_shard), the weight
    whole on every device."""
    o = _Options(impl, bool(power_of_two), bool(interpret), jnp.dtype(out_dtype or x_XC.dtype),
                 jnp.dtype(x_XC.dtype), jnp.dtype(w_CJ.dtype))
    lead, C = x_XC.shape[:-1], x_XC.shape[-1]
    matmul = lambda x_TC, w_CJ: _fp8_matmul_2d(x_TC, w_CJ, o)
    if impl != "reference":
        matmul = on_batch_shards(matmul, n_split=1)
    y_TJ = matmul(x_XC.reshape(-1, C), w_CJ)
    return y_TJ.reshape(*lead, w_CJ.shape[1])
