"""Entry point for grouped matmul: differentiable ops (`grouped_matmul`, `grouped_matmul_fp8`) built on an
implementation of the protocol (gmm / gmm_t / tgmm / gmm_fp8 / tgmm_fp8, see reference.py), chosen by name.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fp8.quantize import quantize_1x128, quantize_128x128
from pallas_kernels.grouped_matmul import reference, tpu
from pallas_kernels.grouped_matmul.layout import aligned_rows, gather_rows

IMPLEMENTATIONS: dict[str, ModuleType] = {"reference": reference, "tpu": tpu}
_LAZY_IMPLEMENTATIONS = {"gpu": "pallas_kernels.grouped_matmul.gpu"}   # imported on first use only


def implementation(impl: str) -> ModuleType:
    """The module implementing the protocol under the name `impl`."""
    if impl in IMPLEMENTATIONS:
        return IMPLEMENTATIONS[impl]
    if impl in _LAZY_IMPLEMENTATIONS:
        try:
            return importlib.import_module(_LAZY_IMPLEMENTATIONS[impl])
        except Exception as e:  # noqa: BLE001 - any failure of that module is reported as unavailable
            raise ImportError(f"grouped_matmul impl={impl!r} unavailable: {_LAZY_IMPLEMENTATIONS[impl]} failed to "
                              f"import ({type(e).__name__}: {e})") from e
    names = sorted([*IMPLEMENTATIONS, *_LAZY_IMPLEMENTATIONS])
    raise ValueError(f"grouped_matmul impl={impl!r} unknown; choose one of {names}")


class _Options(NamedTuple):   # static (hashable) settings of one call
    impl: str
    interpret: object            # bool, or the implementation's interpreter settings (e.g. pltpu.InterpretParams)
    x_dtype: jnp.dtype
    w_dtype: jnp.dtype
    power_of_two: bool = False


def _options(op: str, x_NC, w_ECJ, group_sizes_E, impl: str, interpret: bool, power_of_two: bool = False):
    reference.check_rows(op, x_NC, w_ECJ, group_sizes_E, contract_axis=1)
    implementation(impl)   # an unknown or broken impl fails here, before tracing
    return _Options(impl, interpret, jnp.dtype(x_NC.dtype), jnp.dtype(w_ECJ.dtype), bool(power_of_two))


def grouped_matmul(x_NC, w_ECJ, group_sizes_E, *, impl: str = "reference", interpret: bool = False):
    """y [N, J] in x's dtype: y[rows of g] = x[rows of g] · W[g] (W cast to x's dtype), 0 past sum(group_sizes).
    Gradients: dx in x's dtype, dW in W's dtype; group_sizes_E is not differentiated.
    custom_vjp: dx = gmm_t(dy, W), dW = tgmm(x, dy)."""
    o = _options("grouped_matmul", x_NC, w_ECJ, group_sizes_E, impl, interpret)
    return _grouped_matmul(x_NC, w_ECJ, group_sizes_E.astype(jnp.int32), o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(x_NC, w_ECJ, group_sizes_E, o: _Options):
    return _gmm_forward(x_NC, w_ECJ, group_sizes_E, o)[0]


def _gmm_forward(x_NC, w_ECJ, group_sizes_E, o: _Options):
    w_ECJ = w_ECJ.astype(o.x_dtype)
    y_NJ = implementation(o.impl).gmm(x_NC, w_ECJ, group_sizes_E, out_dtype=o.x_dtype, interpret=o.interpret)
    return y_NJ, (x_NC, w_ECJ, group_sizes_E)


def _gmm_backward(o: _Options, residuals, dy_NJ):
    x_NC, w_ECJ, group_sizes_E = residuals
    m = implementation(o.impl)
    dx_NC = m.gmm_t(dy_NJ, w_ECJ, group_sizes_E, out_dtype=o.x_dtype, interpret=o.interpret)
    dw_ECJ = m.tgmm(x_NC, dy_NJ, group_sizes_E, out_dtype=o.w_dtype, interpret=o.interpret)
    return dx_NC, dw_ECJ, None


_grouped_matmul.defvjp(_gmm_forward, _gmm_backward)


def grouped_matmul_fp8(x_NC, w_ECJ, group_sizes_E, *, impl: str = "reference", interpret: bool = False,
                       power_of_two: bool = False):
    """grouped_matmul with FP8 (E4M3) operands in all three products, float32 accumulation promoted every 128 of the
    contraction. `power_of_two` rounds every scale up to a power of two.

    DeepSeek-V3's FP8 recipe for routed experts, as a custom_vjp:
        forward  y  = gmm_fp8(x in 1×128 tiles, W[g]ᵀ in 128×128 blocks)
        data     dx = gmm_fp8(dy in 1×128 tiles, W[g] = the forward's blocks transposed)
        weight   dW = tgmm_fp8(xᵀ, dyᵀ in 1×128 tiles along the rows) on the group-aligned row layout
                 (layout.aligned_rows: each group starts at a multiple of 128 and is zero-padded to one, built with
                 a gather), so every 128-row scale tile holds rows of one group. The forward saves xᵀ quantized in
                 that layout (FP8) instead of x.
    """
    o = _options("grouped_matmul_fp8", x_NC, w_ECJ, group_sizes_E, impl, interpret, power_of_two)
    return _grouped_matmul_fp8(x_NC, w_ECJ, group_sizes_E.astype(jnp.int32), o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul_fp8(x_NC, w_ECJ, group_sizes_E, o: _Options):
    return _fp8_forward(x_NC, w_ECJ, group_sizes_E, o)[0]


def _fp8_forward(x_NC, w_ECJ, group_sizes_E, o: _Options):
    m = implementation(o.impl)
    x_q, x_scale_NCb = quantize_1x128(x_NC, o.power_of_two)
    wt_q_EJC, wt_scale_EJbCb = jax.vmap(lambda w_CJ: quantize_128x128(w_CJ.T, o.power_of_two))(w_ECJ)
    y_NJ = m.gmm_fp8(x_q, x_scale_NCb, wt_q_EJC, wt_scale_EJbCb, group_sizes_E, out_dtype=o.x_dtype,
                     interpret=o.interpret)
    layout = aligned_rows(group_sizes_E, x_NC.shape[0])
    xt_q_CN, xt_scale_CNb = quantize_1x128(gather_rows(x_NC, layout).T, o.power_of_two)
    return y_NJ, (xt_q_CN, xt_scale_CNb, wt_q_EJC, wt_scale_EJbCb, group_sizes_E)


def _fp8_backward(o: _Options, residuals, dy_NJ):
    xt_q_CN, xt_scale_CNb, wt_q_EJC, wt_scale_EJbCb, group_sizes_E = residuals
    m = implementation(o.impl)
    dy_q, dy_scale_NJb = quantize_1x128(dy_NJ, o.power_of_two)
    # W[g] as the (out, contraction) = (C, J) operand: the forward's 128×128 blocks of W[g]ᵀ, transposed.
    dx_NC = m.gmm_fp8(dy_q, dy_scale_NJb, jnp.swapaxes(wt_q_EJC, 1, 2), jnp.swapaxes(wt_scale_EJbCb, 1, 2),
                      group_sizes_E, out_dtype=o.x_dtype, interpret=o.interpret)
    layout = aligned_rows(group_sizes_E, dy_NJ.shape[0])
    dyt_q_JN, dyt_scale_JNb = quantize_1x128(gather_rows(dy_NJ, layout).T, o.power_of_two)
    dw_ECJ = m.tgmm_fp8(xt_q_CN, xt_scale_CNb, dyt_q_JN, dyt_scale_JNb, layout.group_sizes_E, out_dtype=o.w_dtype,
                        interpret=o.interpret)
    return dx_NC, dw_ECJ, None


_grouped_matmul_fp8.defvjp(_fp8_forward, _fp8_backward)
