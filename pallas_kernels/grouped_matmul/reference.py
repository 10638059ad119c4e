"""Reference grouped matmuls in plain jnp (ragged_dot): the definition the Pallas kernels are held to (rows contiguous
by group, rows past sum(group_sizes) give / contribute nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from pallas_kernels.fp8.quantize import TILE
from pallas_kernels.grouped_matmul.layout import group_of_rows

_HIGHEST = jax.lax.Precision.HIGHEST
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _shape_error(op: str, name: str, want, got) -> ValueError:
    return ValueError(f"{op}: {name} must be {want}, got shape {tuple(got)}")


def check_sizes(op: str, group_sizes_E, E: int | None = None) -> int:
    if group_sizes_E.ndim != 1 or (E is not None and group_sizes_E.shape[0] != E) or group_sizes_E.shape[0] == 0:
        raise _shape_error(op, "group_sizes_E", f"[E]{'' if E is None else f' = [{E}]'} with E >= 1",
                           group_sizes_E.shape)
    if not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
        raise ValueError(f"{op}: group_sizes_E must be integer, got {group_sizes_E.dtype}")
    return group_sizes_E.shape[0]


def check_rows(op: str, lhs_NC, w_EX, group_sizes_E, contract_axis: int):
    """gmm (contract_axis=1: w [E, C, J]) / gmm_t (contract_axis=2: w [E, J, C]) -> (N, C, J, E)."""
    if lhs_NC.ndim != 2:
        raise _shape_error(op, "the row operand", "2-D [N, C]", lhs_NC.shape)
    if w_EX.ndim != 3 or w_EX.shape[contract_axis] != lhs_NC.shape[1]:
        want = "[E, C, J]" if contract_axis == 1 else "[E, J, C]"
        raise _shape_error(op, "the weight", f"{want} with C = {lhs_NC.shape[1]}", w_EX.shape)
    E = check_sizes(op, group_sizes_E, w_EX.shape[0])
    return lhs_NC.shape[0], lhs_NC.shape[1], w_EX.shape[3 - contract_axis], E


def check_tgmm(op: str, x_NC, dy_NJ, group_sizes_E):
    if x_NC.ndim != 2 or dy_NJ.ndim != 2 or x_NC.shape[0] != dy_NJ.shape[0]:
        raise ValueError(f"{op}: x and dy must be [N, C] and [N, J] with the same N, got {tuple(x_NC.shape)} and "
                         f"{tuple(dy_NJ.shape)}")
    return x_NC.shape[0], x_NC.shape[1], dy_NJ.shape[1], check_sizes(op, group_sizes_E)


def check_gmm_fp8(op: str, a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E):
    if a_q_NC.ndim != 2 or b_q_EJC.ndim != 3 or b_q_EJC.shape[2] != a_q_NC.shape[1]:
        raise ValueError(f"{op}: a_q must be [N, C] and b_q [E, J, C], got {tuple(a_q_NC.shape)} and "
                         f"{tuple(b_q_EJC.shape)}")
    (N, C), (E, J, _) = a_q_NC.shape, b_q_EJC.shape
    if a_scale_NCb.shape != (N, pl.cdiv(C, TILE)):
        raise _shape_error(op, "a_scale", f"[N, ceil(C/128)] = {(N, pl.cdiv(C, TILE))}", a_scale_NCb.shape)
    if b_scale_EJbCb.shape != (E, pl.cdiv(J, TILE), pl.cdiv(C, TILE)):
        raise _shape_error(op, "b_scale", f"[E, ceil(J/128), ceil(C/128)] = {(E, pl.cdiv(J, TILE), pl.cdiv(C, TILE))}",
                           b_scale_EJbCb.shape)
    return N, C, J, check_sizes(op, group_sizes_E, E)


def check_tgmm_fp8(op: str, a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E):
    if a_q_CN.ndim != 2 or b_q_JN.ndim != 2 or a_q_CN.shape[1] != b_q_JN.shape[1]:
        raise ValueError(f"{op}: a_q and b_q must be [C, N] and [J, N] with the same N, got {tuple(a_q_CN.shape)} "
                         f"and {tuple(b_q_JN.shape)}")
    (C, N), J = a_q_CN.shape, b_q_JN.shape[0]
    Nb = pl.cdiv(N, TILE)
    if a_scale_CNb.shape != (C, Nb):
        raise _shape_error(op, "a_scale", f"[C, ceil(N/128)] = {(C, Nb)}", a_scale_CNb.shape)
    if b_scale_JNb.shape != (J, Nb):
        raise _shape_error(op, "b_scale", f"[J, ceil(N/128)] = {(J, Nb)}", b_scale_JNb.shape)
    E = check_sizes(op, group_sizes_E)
    sizes = concrete(group_sizes_E)
    if sizes is not None and (sizes % TILE).any():
        raise ValueError(f"{op}: every group_sizes_E must be a multiple of 128 (pad each group), got {sizes.tolist()}")
    return N, C, J, E


def concrete(x):
    """x as a NumPy array when its value is known while tracing, else None (checks that are free only then)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _float_type(*arrays):
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _precision(dtype):
    """HIGHEST for 32-bit (or wider) operands, so float32 is not rounded to bf16 passes; None (the default) for
    16-bit ones, whose products are exact in the float32 accumulation anyway. (TPU's ragged_dot kernel rejects a
    float32 contract precision on bf16 operands.)"""
    return _HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


def gmm(x_NC, w_ECJ, group_sizes_E, *, out_dtype, interpret: bool = False):
    """y[rows of g] = x[rows of g] · w[g] (ragged_dot); float32 accumulation."""
    del interpret
    check_rows("gmm", x_NC, w_ECJ, group_sizes_E, contract_axis=1)
    dtype = jnp.promote_types(x_NC.dtype, w_ECJ.dtype)
    y = jax.lax.ragged_dot(x_NC.astype(dtype), w_ECJ.astype(dtype), group_sizes_E.astype(jnp.int32),
                           precision=_precision(dtype), preferred_element_type=_float_type(x_NC, w_ECJ))
    return y.astype(out_dtype)


def gmm_t(dy_NJ, w_ECJ, group_sizes_E, *, out_dtype, interpret: bool = False):
    """dx[rows of g] = dy[rows of g] · w[g]ᵀ (ragged_dot on w transposed); float32 accumulation."""
    del interpret
    check_rows("gmm_t", dy_NJ, w_ECJ, group_sizes_E, contract_axis=2)
    return gmm(dy_NJ, jnp.swapaxes(w_ECJ, 1, 2), group_sizes_E, out_dtype=out_dtype)


def tgmm(x_NC, dy_NJ, group_sizes_E, *, out_dtype, interpret: bool = False):
    """dw[g] = x[rows of g]ᵀ · dy[rows of g] -> [E, C, J]; zeros for empty groups; float32 accumulation
    (ragged_dot_general with a ragged contracting dimension)."""
    del interpret
    check_tgmm("tgmm", x_NC, dy_NJ, group_sizes_E)
    dtype = jnp.promote_types(x_NC.dtype, dy_NJ.dtype)
    dw = jax.lax.ragged_dot_general(x_NC.astype(dtype), dy_NJ.astype(dtype), group_sizes_E.astype(jnp.int32),
                                    _TGMM_DIMS, precision=_precision(dtype),
                                    preferred_element_type=_float_type(x_NC, dy_NJ))
    return dw.astype(out_dtype)


def gmm_fp8(a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E, *, out_dtype, interpret: bool = False):
    """y[rows of g] = dequant(a)[rows of g] · dequant(b[g])ᵀ, a in 1×128 tiles, b [E, J, C] in 128×128 blocks.
    Per 128 of the contraction the exact FP8 products are summed in float32, the partial scaled by its two scales and
    added to a float32 accumulator (as pallas_kernels.fp8.reference.fp8_matmul); tgmm_fp8 likewise."""
    del interpret
    N, C, J, E = check_gmm_fp8("gmm_fp8", a_q_NC, a_scale_NCb, b_q_EJC, b_scale_EJbCb, group_sizes_E)
    Cb = pl.cdiv(C, TILE)
    # Operands stay E4M3 until their step upcasts them: float32 copies of a whole expert bank do not fit a chip.
    a_CbNc = jnp.pad(a_q_NC, ((0, 0), (0, Cb * TILE - C))).reshape(N, Cb, TILE).swapaxes(0, 1)
    b_CbEcJ = jnp.pad(b_q_EJC, ((0, 0), (0, 0), (0, Cb * TILE - C))).reshape(E, J, Cb, TILE)
    b_CbEcJ = b_CbEcJ.transpose(2, 0, 3, 1)
    sizes = group_sizes_E.astype(jnp.int32)
    # Each row's b scales are those of its group's weight (rows past the groups: any; their partials are 0).
    b_scale_CbNJb = b_scale_EJbCb.astype(jnp.float32)[jnp.minimum(group_of_rows(sizes, N), E - 1)].transpose(2, 0, 1)

    def add_block(acc_NJ, block):
        a_Nc, b_EcJ, sa_N, sb_NJb = block
        # FP8 products are exact in float32; only the 128-term sum rounds.
        partial_NJ = jax.lax.ragged_dot(a_Nc.astype(jnp.float32), b_EcJ.astype(jnp.float32), sizes,
                                        precision=_HIGHEST, preferred_element_type=jnp.float32)
        sb_NJ = jnp.repeat(sb_NJb, TILE, axis=1)[:, :J]
        return acc_NJ + partial_NJ * sa_N[:, None] * sb_NJ, None

    blocks = (a_CbNc, b_CbEcJ, a_scale_NCb.astype(jnp.float32).T, b_scale_CbNJb)
    acc_NJ, _ = jax.lax.scan(add_block, jnp.zeros((N, J), jnp.float32), blocks)
    return acc_NJ.astype(out_dtype)


def tgmm_fp8(a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E, *, out_dtype, interpret: bool = False):
    """dw[g] = dequant(a)[:, rows of g] · dequant(b)[:, rows of g]ᵀ -> [E, C, J]; a, b in 1×128 tiles along N.
    Every group size must be a multiple of 128, so each 128-row tile (one scale) lies in one group."""
    del interpret
    N, C, J, E = check_tgmm_fp8("tgmm_fp8", a_q_CN, a_scale_CNb, b_q_JN, b_scale_JNb, group_sizes_E)
    Nb = pl.cdiv(N, TILE)
    a_NbCn = jnp.pad(a_q_CN, ((0, 0), (0, Nb * TILE - N))).reshape(C, Nb, TILE).swapaxes(0, 1)   # E4M3 until used
    b_NbJn = jnp.pad(b_q_JN, ((0, 0), (0, Nb * TILE - N))).reshape(J, Nb, TILE).swapaxes(0, 1)
    # A tile's group is its first row's (E past the groups: dropped by the scatter below).
    g_Nb = group_of_rows(group_sizes_E.astype(jnp.int32), Nb * TILE)[::TILE]

    def add_tile(dw_ECJ, tile):
        a_Cn, b_Jn, sa_C, sb_J, g = tile
        partial_CJ = jnp.dot(a_Cn.astype(jnp.float32), b_Jn.T.astype(jnp.float32), precision=_HIGHEST,
                             preferred_element_type=jnp.float32)
        return dw_ECJ.at[g].add(partial_CJ * sa_C[:, None] * sb_J[None, :], mode="drop"), None

    tiles = (a_NbCn, b_NbJn, a_scale_CNb.astype(jnp.float32).T, b_scale_JNb.astype(jnp.float32).T, g_Nb)
    dw_ECJ, _ = jax.lax.scan(add_tile, jnp.zeros((E, C, J), jnp.float32), tiles)
    return dw_ECJ.astype(out_dtype)


def grouped_matmul(x_NC, w_ECJ, group_sizes_E):
    """Rows of x are contiguous by group (sizes `group_sizes_E`, summing to <= N); other rows give 0. The plain
    differentiable form (autodiff of ragged_dot), kept for callers that want the reference without the api's
    custom_vjp."""
    return jax.lax.ragged_dot(x_NC, w_ECJ.astype(x_NC.dtype), group_sizes_E.astype(jnp.int32))
