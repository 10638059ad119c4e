"""Reference grouped matmuls in plain jnp: the definition the Pallas kernels are held to (see
/work/notes/gmm_protocol.md; rows contiguous by group, rows past sum(group_sizes) give / contribute nothing).

gmm      y[rows of g]  = x[rows of g] · W[g]            ragged_dot
gmm_t    dx[rows of g] = dy[rows of g] · W[g]ᵀ          ragged_dot on W transposed
tgmm     dW[g]         = x[rows of g]ᵀ · dy[rows of g]  ragged_dot_general, ragged contracting dimension
gmm_fp8 / tgmm_fp8: E4M3 operands with float32 scales; per 128 of the contraction the exact FP8 products are
summed in float32, the partial scaled by its two scales and added to a float32 accumulator (as
pallas_kernels.fp8.reference.fp8_matmul). `grouped_matmul` is the plain differentiable form (autodiff of
ragged_dot), kept for callers that want the reference without the api's custom_vjp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8.quantize import TILE, _cdiv
from pallas_kernels.grouped_matmul.layout import group_of_rows

_HIGHEST = jax.lax.Precision.HIGHEST
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _shape_error(op: str, name: str, want, got) -> ValueError:
    return ValueError(f"{op}: {name} must be {want}, got shape {tuple(got)}")


def check_sizes(op: str, group_sizes_G, G: int | None = None) -> int:
    if group_sizes_G.ndim != 1 or (G is not None and group_sizes_G.shape[0] != G) or group_sizes_G.shape[0] == 0:
        raise _shape_error(op, "group_sizes_G", f"[G]{'' if G is None else f' = [{G}]'} with G >= 1",
                           group_sizes_G.shape)
    if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
        raise ValueError(f"{op}: group_sizes_G must be integer, got {group_sizes_G.dtype}")
    return group_sizes_G.shape[0]


def check_rows(op: str, lhs_MC, w_GAB, group_sizes_G, contract_axis: int):
    """gmm (contract_axis=1: w [G, C, O]) / gmm_t (contract_axis=2: w [G, O, C]) -> (M, C, O, G)."""
    if lhs_MC.ndim != 2:
        raise _shape_error(op, "the row operand", "2-D [M, C]", lhs_MC.shape)
    if w_GAB.ndim != 3 or w_GAB.shape[contract_axis] != lhs_MC.shape[1]:
        want = "[G, C, N]" if contract_axis == 1 else "[G, N, C]"
        raise _shape_error(op, "the weight", f"{want} with C = {lhs_MC.shape[1]}", w_GAB.shape)
    G = check_sizes(op, group_sizes_G, w_GAB.shape[0])
    return lhs_MC.shape[0], lhs_MC.shape[1], w_GAB.shape[3 - contract_axis], G


def check_tgmm(op: str, x_MK, dy_MN, group_sizes_G):
    if x_MK.ndim != 2 or dy_MN.ndim != 2 or x_MK.shape[0] != dy_MN.shape[0]:
        raise ValueError(f"{op}: x and dy must be [M, K] and [M, N] with the same M, got {tuple(x_MK.shape)} and "
                         f"{tuple(dy_MN.shape)}")
    return x_MK.shape[0], x_MK.shape[1], dy_MN.shape[1], check_sizes(op, group_sizes_G)


def check_gmm_fp8(op: str, a_q_MK, a_scale_MKb, b_q_GNK, b_scale_GNbKb, group_sizes_G):
    if a_q_MK.ndim != 2 or b_q_GNK.ndim != 3 or b_q_GNK.shape[2] != a_q_MK.shape[1]:
        raise ValueError(f"{op}: a_q must be [M, K] and b_q [G, N, K], got {tuple(a_q_MK.shape)} and "
                         f"{tuple(b_q_GNK.shape)}")
    (M, K), (G, N, _) = a_q_MK.shape, b_q_GNK.shape
    if a_scale_MKb.shape != (M, _cdiv(K, TILE)):
        raise _shape_error(op, "a_scale", f"[M, ceil(K/128)] = {(M, _cdiv(K, TILE))}", a_scale_MKb.shape)
    if b_scale_GNbKb.shape != (G, _cdiv(N, TILE), _cdiv(K, TILE)):
        raise _shape_error(op, "b_scale", f"[G, ceil(N/128), ceil(K/128)] = {(G, _cdiv(N, TILE), _cdiv(K, TILE))}",
                           b_scale_GNbKb.shape)
    return M, K, N, check_sizes(op, group_sizes_G, G)


def check_tgmm_fp8(op: str, a_q_KM, a_scale_KMb, b_q_NM, b_scale_NMb, group_sizes_G):
    if a_q_KM.ndim != 2 or b_q_NM.ndim != 2 or a_q_KM.shape[1] != b_q_NM.shape[1]:
        raise ValueError(f"{op}: a_q and b_q must be [K, M] and [N, M] with the same M, got {tuple(a_q_KM.shape)} "
                         f"and {tuple(b_q_NM.shape)}")
    (K, M), N = a_q_KM.shape, b_q_NM.shape[0]
    Mb = _cdiv(M, TILE)
    if a_scale_KMb.shape != (K, Mb):
        raise _shape_error(op, "a_scale", f"[K, ceil(M/128)] = {(K, Mb)}", a_scale_KMb.shape)
    if b_scale_NMb.shape != (N, Mb):
        raise _shape_error(op, "b_scale", f"[N, ceil(M/128)] = {(N, Mb)}", b_scale_NMb.shape)
    G = check_sizes(op, group_sizes_G)
    sizes = concrete(group_sizes_G)
    if sizes is not None and (sizes % TILE).any():
        raise ValueError(f"{op}: every group_sizes_G must be a multiple of 128 (pad each group), got {sizes.tolist()}")
    return M, K, N, G


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


def gmm(x_MK, w_GKN, group_sizes_G, *, out_dtype, interpret: bool = False):
    """y[rows of g] = x[rows of g] · w[g]; float32 accumulation."""
    del interpret
    check_rows("gmm", x_MK, w_GKN, group_sizes_G, contract_axis=1)
    dtype = jnp.promote_types(x_MK.dtype, w_GKN.dtype)
    y = jax.lax.ragged_dot(x_MK.astype(dtype), w_GKN.astype(dtype), group_sizes_G.astype(jnp.int32),
                           precision=_precision(dtype), preferred_element_type=_float_type(x_MK, w_GKN))
    return y.astype(out_dtype)


def gmm_t(dy_MN, w_GKN, group_sizes_G, *, out_dtype, interpret: bool = False):
    """dx[rows of g] = dy[rows of g] · w[g]ᵀ; float32 accumulation."""
    del interpret
    check_rows("gmm_t", dy_MN, w_GKN, group_sizes_G, contract_axis=2)
    return gmm(dy_MN, jnp.swapaxes(w_GKN, 1, 2), group_sizes_G, out_dtype=out_dtype)


def tgmm(x_MK, dy_MN, group_sizes_G, *, out_dtype, interpret: bool = False):
    """dw[g] = x[rows of g]ᵀ · dy[rows of g] -> [G, K, N]; zeros for empty groups; float32 accumulation."""
    del interpret
    check_tgmm("tgmm", x_MK, dy_MN, group_sizes_G)
    dtype = jnp.promote_types(x_MK.dtype, dy_MN.dtype)
    dw = jax.lax.ragged_dot_general(x_MK.astype(dtype), dy_MN.astype(dtype), group_sizes_G.astype(jnp.int32),
                                    _TGMM_DIMS, precision=_precision(dtype),
                                    preferred_element_type=_float_type(x_MK, dy_MN))
    return dw.astype(out_dtype)


def gmm_fp8(a_q_MK, a_scale_MKb, b_q_GNK, b_scale_GNbKb, group_sizes_G, *, out_dtype, interpret: bool = False):
    """y[rows of g] = dequant(a)[rows of g] · dequant(b[g])ᵀ, a in 1×128 tiles, b [G, N, K] in 128×128 blocks."""
    del interpret
    M, K, N, G = check_gmm_fp8("gmm_fp8", a_q_MK, a_scale_MKb, b_q_GNK, b_scale_GNbKb, group_sizes_G)
    Kb = _cdiv(K, TILE)
    # Operands stay E4M3 until their step upcasts them: float32 copies of a whole expert bank do not fit a chip.
    a_KbMC = jnp.pad(a_q_MK, ((0, 0), (0, Kb * TILE - K))).reshape(M, Kb, TILE).swapaxes(0, 1)
    b_KbGCN = jnp.pad(b_q_GNK, ((0, 0), (0, 0), (0, Kb * TILE - K))).reshape(G, N, Kb, TILE)
    b_KbGCN = b_KbGCN.transpose(2, 0, 3, 1)
    sizes = group_sizes_G.astype(jnp.int32)
    # Each row's b scales are those of its group's weight (rows past the groups: any; their partials are 0).
    b_scale_KbMNb = b_scale_GNbKb.astype(jnp.float32)[jnp.minimum(group_of_rows(sizes, M), G - 1)].transpose(2, 0, 1)

    def add_block(acc_MN, block):
        a_MC, b_GCN, sa_M, sb_MNb = block
        # FP8 products are exact in float32; only the 128-term sum rounds.
        partial_MN = jax.lax.ragged_dot(a_MC.astype(jnp.float32), b_GCN.astype(jnp.float32), sizes,
                                        precision=_HIGHEST, preferred_element_type=jnp.float32)
        sb_MN = jnp.repeat(sb_MNb, TILE, axis=1)[:, :N]
        return acc_MN + partial_MN * sa_M[:, None] * sb_MN, None

    blocks = (a_KbMC, b_KbGCN, a_scale_MKb.astype(jnp.float32).T, b_scale_KbMNb)
    acc_MN, _ = jax.lax.scan(add_block, jnp.zeros((M, N), jnp.float32), blocks)
    return acc_MN.astype(out_dtype)


def tgmm_fp8(a_q_KM, a_scale_KMb, b_q_NM, b_scale_NMb, group_sizes_G, *, out_dtype, interpret: bool = False):
    """dw[g] = dequant(a)[:, rows of g] · dequant(b)[:, rows of g]ᵀ -> [G, K, N]; a, b in 1×128 tiles along M.
    Every group size must be a multiple of 128, so each 128-row tile (one scale) lies in one group."""
    del interpret
    M, K, N, G = check_tgmm_fp8("tgmm_fp8", a_q_KM, a_scale_KMb, b_q_NM, b_scale_NMb, group_sizes_G)
    Mb = _cdiv(M, TILE)
    a_MbKC = jnp.pad(a_q_KM, ((0, 0), (0, Mb * TILE - M))).reshape(K, Mb, TILE).swapaxes(0, 1)   # E4M3 until used
    b_MbNC = jnp.pad(b_q_NM, ((0, 0), (0, Mb * TILE - M))).reshape(N, Mb, TILE).swapaxes(0, 1)
    # A tile's group is its first row's (G past the groups: dropped by the scatter below).
    g_Mb = group_of_rows(group_sizes_G.astype(jnp.int32), Mb * TILE)[::TILE]

    def add_tile(dw_GKN, tile):
        a_KC, b_NC, sa_K, sb_N, g = tile
        partial_KN = jnp.dot(a_KC.astype(jnp.float32), b_NC.T.astype(jnp.float32), precision=_HIGHEST,
                             preferred_element_type=jnp.float32)
        return dw_GKN.at[g].add(partial_KN * sa_K[:, None] * sb_N[None, :], mode="drop"), None

    tiles = (a_MbKC, b_MbNC, a_scale_KMb.astype(jnp.float32).T, b_scale_NMb.astype(jnp.float32).T, g_Mb)
    dw_GKN, _ = jax.lax.scan(add_tile, jnp.zeros((G, K, N), jnp.float32), tiles)
    return dw_GKN.astype(out_dtype)


def grouped_matmul(x_MK, w_GKN, group_sizes_G):
    """Rows of x are contiguous by group (sizes `group_sizes_G`, summing to <= M); other rows give 0."""
    return jax.lax.ragged_dot(x_MK, w_GKN.astype(x_MK.dtype), group_sizes_G.astype(jnp.int32))
