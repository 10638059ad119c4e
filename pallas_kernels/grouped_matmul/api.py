"""Entry point for grouped matmul: differentiable ops built on an implementation of the protocol
(gmm / gmm_t / tgmm / gmm_fp8 / tgmm_fp8, see reference.py), chosen by name.

grouped_matmul      y = x·W[g] per group; custom_vjp: dx = gmm_t(dy, W), dW = tgmm(x, dy).
grouped_matmul_fp8  DeepSeek-V3's FP8 recipe for routed experts, custom_vjp:
    forward  y  = gmm_fp8(x in 1×128 tiles, W[g]ᵀ in 128×128 blocks)
    data     dx = gmm_fp8(dy in 1×128 tiles, W[g] = the forward's blocks transposed)
    weight   dW = tgmm_fp8(xᵀ, dyᵀ in 1×128 tiles along the rows) on the group-aligned row layout
             (layout.aligned_rows: each group starts at a multiple of 128 and is zero-padded to one, built with a
             gather), so every 128-row scale tile holds rows of one group. The forward saves xᵀ quantized in that
             layout (FP8) instead of x.
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


def _options(op: str, x_MK, w_GKN, group_sizes_G, impl: str, interpret: bool, power_of_two: bool = False):
    reference.check_rows(op, x_MK, w_GKN, group_sizes_G, contract_axis=1)
    implementation(impl)   # an unknown or broken impl fails here, before tracing
    return _Options(impl, interpret, jnp.dtype(x_MK.dtype), jnp.dtype(w_GKN.dtype), bool(power_of_two))


def grouped_matmul(x_MK, w_GKN, group_sizes_G, *, impl: str = "reference", interpret: bool = False):
    """y [M, N] in x's dtype: y[rows of g] = x[rows of g] · W[g] (W cast to x's dtype), 0 past sum(group_sizes).
    Gradients: dx in x's dtype, dW in W's dtype; group_sizes_G is not differentiated."""
    o = _options("grouped_matmul", x_MK, w_GKN, group_sizes_G, impl, interpret)
    return _grouped_matmul(x_MK, w_GKN, group_sizes_G.astype(jnp.int32), o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(x_MK, w_GKN, group_sizes_G, o: _Options):
    return _gmm_forward(x_MK, w_GKN, group_sizes_G, o)[0]


def _gmm_forward(x_MK, w_GKN, group_sizes_G, o: _Options):
    w_GKN = w_GKN.astype(o.x_dtype)
    y_MN = implementation(o.impl).gmm(x_MK, w_GKN, group_sizes_G, out_dtype=o.x_dtype, interpret=o.interpret)
    return y_MN, (x_MK, w_GKN, group_sizes_G)


def _gmm_backward(o: _Options, residuals, dy_MN):
    x_MK, w_GKN, group_sizes_G = residuals
    m = implementation(o.impl)
    dx_MK = m.gmm_t(dy_MN, w_GKN, group_sizes_G, out_dtype=o.x_dtype, interpret=o.interpret)
    dw_GKN = m.tgmm(x_MK, dy_MN, group_sizes_G, out_dtype=o.w_dtype, interpret=o.interpret)
    return dx_MK, dw_GKN, None


_grouped_matmul.defvjp(_gmm_forward, _gmm_backward)


def grouped_matmul_fp8(x_MK, w_GKN, group_sizes_G, *, impl: str = "reference", interpret: bool = False,
                       power_of_two: bool = False):
    """grouped_matmul with FP8 (E4M3) operands in all three products (module docstring), float32 accumulation
    promoted every 128 of the contraction. `power_of_two` rounds every scale up to a power of two."""
    o = _options("grouped_matmul_fp8", x_MK, w_GKN, group_sizes_G, impl, interpret, power_of_two)
    return _grouped_matmul_fp8(x_MK, w_GKN, group_sizes_G.astype(jnp.int32), o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul_fp8(x_MK, w_GKN, group_sizes_G, o: _Options):
    return _fp8_forward(x_MK, w_GKN, group_sizes_G, o)[0]


def _fp8_forward(x_MK, w_GKN, group_sizes_G, o: _Options):
    m = implementation(o.impl)
    x_q, x_scale_MKb = quantize_1x128(x_MK, o.power_of_two)
    wt_q_GNK, wt_scale_GNbKb = jax.vmap(lambda w_KN: quantize_128x128(w_KN.T, o.power_of_two))(w_GKN)
    y_MN = m.gmm_fp8(x_q, x_scale_MKb, wt_q_GNK, wt_scale_GNbKb, group_sizes_G, out_dtype=o.x_dtype,
                     interpret=o.interpret)
    layout = aligned_rows(group_sizes_G, x_MK.shape[0])
    xt_q_KP, xt_scale_KPb = quantize_1x128(gather_rows(x_MK, layout).T, o.power_of_two)
    return y_MN, (xt_q_KP, xt_scale_KPb, wt_q_GNK, wt_scale_GNbKb, group_sizes_G)


def _fp8_backward(o: _Options, residuals, dy_MN):
    xt_q_KP, xt_scale_KPb, wt_q_GNK, wt_scale_GNbKb, group_sizes_G = residuals
    m = implementation(o.impl)
    dy_q, dy_scale_MNb = quantize_1x128(dy_MN, o.power_of_two)
    # W[g] as the (out, contraction) = (K, N) operand: the forward's 128×128 blocks of W[g]ᵀ, transposed.
    dx_MK = m.gmm_fp8(dy_q, dy_scale_MNb, jnp.swapaxes(wt_q_GNK, 1, 2), jnp.swapaxes(wt_scale_GNbKb, 1, 2),
                      group_sizes_G, out_dtype=o.x_dtype, interpret=o.interpret)
    layout = aligned_rows(group_sizes_G, dy_MN.shape[0])
    dyt_q_NP, dyt_scale_NPb = quantize_1x128(gather_rows(dy_MN, layout).T, o.power_of_two)
    dw_GKN = m.tgmm_fp8(xt_q_KP, xt_scale_KPb, dyt_q_NP, dyt_scale_NPb, layout.group_sizes_G, out_dtype=o.w_dtype,
                        interpret=o.interpret)
    return dx_MK, dw_GKN, None


_grouped_matmul_fp8.defvjp(_fp8_forward, _fp8_backward)
