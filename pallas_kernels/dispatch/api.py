"""Entry point for dispatch/combine: implementations by name ("reference", "tpu", "gpu"), one custom_vjp for all."""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import reference
from pallas_kernels.dispatch.layout import Dispatched, check_routing, padded_rows, route_layout

__all__ = ["Dispatched", "IMPLEMENTATIONS", "combine", "dispatch", "padded_rows"]

# Kernel modules are imported on first use, so the reference never needs a Pallas backend to import.
IMPLEMENTATIONS = {"reference": "pallas_kernels.dispatch.reference", "tpu": "pallas_kernels.dispatch.tpu",
                   "gpu": "pallas_kernels.dispatch.gpu"}


class RowOps(NamedTuple):
    """The three row operations every implementation provides (see `reference`). The vjp composes them the same way
    for each:
      dispatch  forward: gather (optionally fused FP8 quantization)   backward: unweighted combine of the row grads
      combine   forward: weighted combine in float32                  backward: weighted gather of the output grad,
                                                                      and dweights[t, k] = <y[row(t, k)], dout[t]>
    """

    gather_rows: Callable
    combine_rows: Callable
    combine_rows_grad: Callable


@functools.cache
def row_ops(impl: str) -> RowOps:
    try:
        module = importlib.import_module(IMPLEMENTATIONS[impl])
    except KeyError:
        raise ValueError(f"dispatch impl={impl!r} unknown; choose one of {sorted(IMPLEMENTATIONS)}") from None
    return RowOps(module.gather_rows, module.combine_rows, module.combine_rows_grad)


class _Impl(NamedTuple):
    ops: RowOps
    interpret: Any   # False on device; True (or interpret params) to run the kernels on CPU


def _pick(impl: str, interpret) -> _Impl:
    return _Impl(row_ops(impl), interpret)


# ---- dispatch: gather, backward = unweighted combine ----

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gather(im: _Impl, quantize: bool, power_of_two: bool, x_TD, src_N, row_TK):
    return im.ops.gather_rows(x_TD, src_N, quantize=quantize, power_of_two=power_of_two, interpret=im.interpret)


def _gather_fwd(im, quantize, power_of_two, x_TD, src_N, row_TK):
    return _gather(im, quantize, power_of_two, x_TD, src_N, row_TK), row_TK


def _gather_bwd(im, quantize, power_of_two, row_TK, cts):
    dx_ND = cts[0]
    dx_TD = im.ops.combine_rows(dx_ND, row_TK, None, dx_ND.dtype, interpret=im.interpret)
    return dx_TD, None, None


_gather.defvjp(_gather_fwd, _gather_bwd)


# ---- combine: weighted sum, backward = weighted gather + routing-weight gradient ----

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine(im: _Impl, out_dtype, y_ND, weights_TK, row_TK, order_N):
    return im.ops.combine_rows(y_ND, row_TK, weights_TK, out_dtype, interpret=im.interpret)


def _combine_fwd(im, out_dtype, y_ND, weights_TK, row_TK, order_N):
    return _combine(im, out_dtype, y_ND, weights_TK, row_TK, order_N), (y_ND, weights_TK, row_TK, order_N)


def _combine_bwd(im, out_dtype, residuals, dout_TD):
    y_ND, weights_TK, row_TK, order_N = residuals
    K = weights_TK.shape[1]
    w_N = jnp.take(weights_TK.reshape(-1), order_N, mode="fill", fill_value=0)   # padding rows: 0
    dy_ND, dw_N = im.ops.combine_rows_grad(y_ND, dout_TD, order_N // K, w_N, interpret=im.interpret)
    dw_TK = jnp.take(dw_N, row_TK.reshape(-1)).reshape(weights_TK.shape).astype(weights_TK.dtype)
    return dy_ND, dw_TK, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def dispatch(x_TD, expert_idx_TK, n_experts: int, *, impl: str = "reference", align: int = 1,
             quantize: bool = False, power_of_two: bool = False, interpret=False) -> Dispatched:
    """Rows of x_TD gathered into expert-contiguous order (stable by token within an expert).

    align: pad every expert's group with zero rows to a multiple of `align` (x_ND then has
    `padded_rows(T·K, n_experts, align)` rows). quantize: also return x_q_ND (E4M3) and scale_NDb as
    `pallas_kernels.fp8.quantize_1x128(x_ND, power_of_two)` computes them. Differentiable in x_TD; the FP8 outputs
    (x_q_ND, scale_NDb) carry no gradient: a consumer differentiates through x_ND.
    """
    check_routing(x_TD, expert_idx_TK, n_experts, align)
    im = _pick(impl, interpret)
    lay = route_layout(expert_idx_TK, n_experts, align)
    x_ND, x_q, scale = _gather(im, quantize, power_of_two, x_TD, lay.src_N, lay.row_TK)
    return Dispatched(x_ND, lay.group_sizes_E, lay.order_N, lay.row_TK, lay.group_offsets_E, x_q, scale)


def combine(y_ND, weights_TK, order_N, out_dtype=None, *, row_TK=None, impl: str = "reference", interpret=False):
    """out[t] = Σ_k weights_TK[t, k] · y_ND[row of (t, k)], accumulated in float32, cast to out_dtype (default
    y's dtype). order_N comes from `dispatch` (padding rows: T·K); pass its row_TK to skip inverting order_N.
    Differentiable in y_ND and weights_TK."""
    T, K = weights_TK.shape
    if y_ND.ndim != 2 or order_N.shape != (y_ND.shape[0],):
        raise ValueError(f"combine: y_ND {y_ND.shape} must be [N, D] with order_N {order_N.shape} of length N")
    if row_TK is None:
        row_TK = reference.rows_of(order_N, T * K).reshape(T, K)
    elif row_TK.shape != (T, K):
        raise ValueError(f"combine: row_TK {row_TK.shape} must match weights_TK {weights_TK.shape}")
    im = _pick(impl, interpret)
    return _combine(im, jnp.dtype(out_dtype or y_ND.dtype), y_ND, weights_TK, row_TK.astype(jnp.int32),
                    order_N.astype(jnp.int32))
