"""Reference dispatch/combine in plain jnp: the definition the kernels are held to. `dispatch`/`combine` are the plain
definitions (differentiated by JAX); the row operations below them are the reference implementation behind `api`,
whose custom_vjp composes them exactly as it composes the kernels'.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.dispatch.layout import Dispatched, check_routing, route_layout
from pallas_kernels.fp8.quantize import quantize_1x128

__all__ = ["Dispatched", "combine", "combine_rows", "combine_rows_grad", "dispatch", "gather_rows", "rows_of"]


def dispatch(x_TD, expert_idx_TK, n_experts: int, align: int = 1, quantize: bool = False,
             power_of_two: bool = False) -> Dispatched:
    """The T·K (token, choice) pairs sorted by expert (`layout.route_layout`), the token rows gathered in that order
    (zero rows where groups are padded to `align`), optionally also quantized to E4M3 in 1×128 tiles."""
    check_routing(x_TD, expert_idx_TK, n_experts, align)
    lay = route_layout(expert_idx_TK, n_experts, align)
    x_ND = jnp.take(x_TD, lay.src_N, axis=0, mode="fill", fill_value=0)
    x_q, scale = quantize_1x128(x_ND, power_of_two) if quantize else (None, None)
    return Dispatched(x_ND, lay.group_sizes_E, lay.order_N, lay.row_TK, lay.group_offsets_E, x_q, scale)


def rows_of(order_N, n_pairs: int):
    """row_TK (flat) from order_N: the row holding each pair; padding rows (order_N = n_pairs) are skipped."""
    n = order_N.shape[0]
    return jnp.zeros((n_pairs,), jnp.int32).at[order_N].set(jnp.arange(n, dtype=jnp.int32), mode="drop",
                                                            unique_indices=True)


def combine(y_ND, weights_TK, order_N, out_dtype=None):
    """out[t] = Σ_k weights[t, k] · y[row of (t, k)], summed in float32."""
    T, K = weights_TK.shape
    y_TKD = jnp.take(y_ND, rows_of(order_N, T * K), axis=0).reshape(T, K, -1)
    out_TD = (y_TKD.astype(jnp.float32) * weights_TK.astype(jnp.float32)[..., None]).sum(axis=1)
    return out_TD.astype(out_dtype or y_ND.dtype)


# ---- row operations: the reference implementation behind api.dispatch / api.combine ----

def gather_rows(x_TD, src_N, *, quantize: bool = False, power_of_two: bool = False, interpret=None):
    """x_ND[n] = x_TD[src_N[n]] (0 where src_N is outside [0, T)); with `quantize` also (x_q_ND, scale_NDb)."""
    del interpret
    x_ND = jnp.take(x_TD, src_N, axis=0, mode="fill", fill_value=0)
    x_q, scale = quantize_1x128(x_ND, power_of_two) if quantize else (None, None)
    return x_ND, x_q, scale


def combine_rows(y_ND, row_TK, weights_TK, out_dtype, *, interpret=None):
    """out[t] = Σ_k weights[t, k] · y[row_TK[t, k]] in float32 (weights None: 1); rows outside [0, N) add 0."""
    del interpret
    T, K = row_TK.shape
    y_TKD = jnp.take(y_ND, row_TK.reshape(-1), axis=0, mode="fill", fill_value=0).reshape(T, K, -1)
    y_TKD = y_TKD.astype(jnp.float32)
    if weights_TK is None:
        return y_TKD.sum(axis=1).astype(out_dtype)
    return (y_TKD * weights_TK.astype(jnp.float32)[..., None]).sum(axis=1).astype(out_dtype)


def combine_rows_grad(y_ND, dout_TD, src_N, w_N, *, interpret=None):
    """Backward of combine per row: dy[n] = w[n] · dout[src[n]] (y's dtype), dw[n] = <y[n], dout[src[n]]>
    (float32); both 0 where src_N is outside [0, T)."""
    del interpret
    g_ND = jnp.take(dout_TD, src_N, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    dy_ND = (g_ND * w_N.astype(jnp.float32)[:, None]).astype(y_ND.dtype)
    dw_N = jnp.sum(y_ND.astype(jnp.float32) * g_ND, axis=1)
    return dy_ND, dw_N
