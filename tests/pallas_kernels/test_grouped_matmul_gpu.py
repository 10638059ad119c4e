"""Mosaic GPU grouped matmul (pallas_kernels/grouped_matmul/gpu.py) on a CPU host.

(a) Each of the five functions runs in Mosaic GPU interpret mode on small ragged problems (an empty group,
unaligned group sizes, rows past sum(group_sizes), shapes that need padding) and is compared to a float64
numpy oracle written here. NaN in the rows no group owns checks that the row-masked stores and the masked
weight-gradient chunks keep them out. JAX 0.10's interpreter has no register layouts, so in interpret mode the
kernels skip layout casts (transposed WGMMA operands go through pallas_kernels.gpu_interpret); everything else
(TMA pipeline, warpgroups, barriers, transposed and FP8 WGMMA, FP8 promotion, epilogue stores) is the GPU code
path.
(b) Each function is lowered for CUDA (the full Pallas -> Mosaic GPU lowering, no GPU needed) at DeepSeek-V3's
expert shape: 32 groups x 1024 rows, K 7168 -> N 2048, with the default H100 tilings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_compat
from pallas_kernels.fp8.quantize import quantize_1x128, quantize_128x128
from pallas_kernels.grouped_matmul import gpu
from pallas_kernels.grouped_matmul.gpu import GpuTiling
from pallas_kernels.grouped_matmul.gpu_schedule import row_tile_items


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    # A failed interpreted kernel leaves the simulator's global state behind; start every test clean.
    jax_compat.reset_gpu_interpreter()
    yield


def _bounds(sizes):
    ends = np.cumsum(sizes)
    return list(zip(ends - sizes, ends))


def _rows_oracle(x_MK, w_GKN, sizes, transpose_w=False):
    x, w = np.asarray(x_MK, np.float64), np.asarray(w_GKN, np.float64)
    out = np.zeros((x.shape[0], w.shape[1] if transpose_w else w.shape[2]))
    for g, (s, e) in enumerate(_bounds(sizes)):
        out[s:e] = x[s:e] @ (w[g].T if transpose_w else w[g])
    return out


def _tgmm_oracle(x_MK, dy_MN, sizes):
    x, dy = np.asarray(x_MK, np.float64), np.asarray(dy_MN, np.float64)
    return np.stack([x[s:e].T @ dy[s:e] for s, e in _bounds(sizes)])


def _ragged_operand(rng, shape, total_rows, dtype=jnp.bfloat16):
    """Normal values; NaN in the rows at or past `total_rows`, which no group owns."""
    x = rng.normal(size=shape).astype(np.float32)
    x[total_rows:] = np.nan
    return jnp.asarray(x, dtype)


# Unaligned sizes, an empty group, 30 rows past the last group; 250 rows is not a multiple of any tile.
SIZES = np.array([70, 0, 100, 50], np.int32)
M = 250


def test_row_tile_items_cover_every_row_once():
    sizes = jnp.asarray([70, 0, 100, 50, 0, 64], jnp.int32)
    seg, tile, lo, hi = (np.asarray(a) for a in jax.jit(row_tile_items, static_argnums=(1, 2))(sizes, 300, 64))
    owner = np.full(300, -1)
    for s, t, a, b in zip(seg, tile, lo, hi):
        if b > a:
            assert t * 64 <= a < b <= t * 64 + 64
            assert (owner[a:b] == -1).all()
            owner[a:b] = s
    expected = np.concatenate([np.full(n, g) for g, n in enumerate(np.asarray(sizes))] + [np.full(16, 6)])
    np.testing.assert_array_equal(owner, expected)


def test_gmm_interpret():
    rng = np.random.default_rng(0)
    x = _ragged_operand(rng, (M, 128), SIZES.sum())
    w = jnp.asarray(rng.normal(size=(4, 128, 128)), jnp.bfloat16)
    tiling = GpuTiling(block_m=64, block_n=128, block_k=64, stages=2, compute_wgs=2, wg_split="n")
    y = gpu.gmm(x, w, jnp.asarray(SIZES), out_dtype=jnp.float32, interpret=True, tiling=tiling)
    assert y.shape == (M, 128) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _rows_oracle(x, w, SIZES), rtol=1e-5, atol=1e-4)


def test_gmm_t_interpret():
    # Output columns K=192 and contraction N=96 both need padding; bf16 output; a single consumer warpgroup.
    rng = np.random.default_rng(1)
    dy = _ragged_operand(rng, (M, 96), SIZES.sum())
    w = jnp.asarray(rng.normal(size=(4, 192, 96)), jnp.bfloat16)
    tiling = GpuTiling(block_m=64, block_n=128, block_k=32, stages=3, compute_wgs=1)
    dx = gpu.gmm_t(dy, w, jnp.asarray(SIZES), out_dtype=jnp.bfloat16, interpret=True, tiling=tiling)
    assert dx.shape == (M, 192) and dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dx, np.float32), _rows_oracle(dy, w, SIZES, transpose_w=True),
                               rtol=1e-2, atol=5e-2)


def test_tgmm_interpret():
    rng = np.random.default_rng(2)
    x = _ragged_operand(rng, (M, 128), SIZES.sum())
    dy = _ragged_operand(rng, (M, 128), SIZES.sum())
    tiling = GpuTiling(block_m=128, block_n=128, block_k=64, stages=2, compute_wgs=2, wg_split="n")
    dw = gpu.tgmm(x, dy, jnp.asarray(SIZES), out_dtype=jnp.float32, interpret=True, tiling=tiling)
    assert dw.shape == (4, 128, 128) and dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dw), _tgmm_oracle(x, dy, SIZES), rtol=1e-5, atol=1e-4)


def _fp8_rows_oracle(a_q, a_scale, b_q, b_scale, sizes):
    """Σ_kb (a_q · b_q[g].T over block kb) · a_scale[:, kb] · b_scale[g, n // 128, kb], per group's rows."""
    a, b = np.asarray(a_q, np.float64), np.asarray(b_q, np.float64)
    sa, sb = np.asarray(a_scale, np.float64), np.asarray(b_scale, np.float64)
    out = np.zeros((a.shape[0], b.shape[1]))
    for g, (s, e) in enumerate(_bounds(sizes)):
        for kb in range(sa.shape[1]):
            blk = slice(kb * 128, (kb + 1) * 128)
            col_scale = np.repeat(sb[g, :, kb], 128)[:b.shape[1]]
            out[s:e] += (a[s:e, blk] @ b[g, :, blk].T) * sa[s:e, kb, None] * col_scale[None]
    return out


def test_gmm_fp8_interpret():
    # K = 256: promotion over two scale blocks; N = 256: two N tiles with different weight scales.
    sizes = np.array([60, 0, 90, 26], np.int32)
    rows, K, N = 200, 256, 256
    rng = np.random.default_rng(3)
    x = rng.normal(size=(rows, K)) * np.exp(rng.normal(size=(rows, 1)))
    a_q, a_scale = jax.jit(quantize_1x128)(jnp.asarray(x, jnp.float32))
    w_GNK = rng.normal(size=(4, N, K)) * np.exp(rng.normal(size=(4, 1, 1)))
    b_q, b_scale = jax.jit(jax.vmap(quantize_128x128))(jnp.asarray(w_GNK, jnp.float32))
    tiling = GpuTiling(block_m=128, block_n=128, block_k=128, stages=2, compute_wgs=2, wg_split="m")
    y = gpu.gmm_fp8(a_q, a_scale, b_q, b_scale, jnp.asarray(sizes), out_dtype=jnp.float32, interpret=True,
                    tiling=tiling)
    assert y.shape == (rows, N) and y.dtype == jnp.float32
    expected = _fp8_rows_oracle(a_q, a_scale, b_q, b_scale, sizes)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_tgmm_fp8_interpret():
    # Groups of 128, 0, 256 and 128 rows and a 128-row tail that must not contribute.
    sizes = np.array([128, 0, 256, 128], np.int32)
    rows, K, N = 640, 128, 256
    rng = np.random.default_rng(4)
    x = rng.normal(size=(rows, K)) * np.exp(rng.normal(size=(rows, 1)))
    dy = rng.normal(size=(rows, N)) * np.exp(rng.normal(size=(1, N)))
    quantize = jax.jit(quantize_1x128)
    a_q, a_scale = quantize(jnp.asarray(x.T, jnp.float32))      # (K, M), scales (K, Mb)
    b_q, b_scale = quantize(jnp.asarray(dy.T, jnp.float32))     # (N, M), scales (N, Mb)
    tiling = GpuTiling(block_m=128, block_n=128, block_k=128, stages=2, compute_wgs=2, wg_split="m")
    dw = gpu.tgmm_fp8(a_q, a_scale, b_q, b_scale, jnp.asarray(sizes), out_dtype=jnp.float32, interpret=True,
                      tiling=tiling)
    assert dw.shape == (4, K, N) and dw.dtype == jnp.float32
    a = np.asarray(a_q, np.float64) * np.repeat(np.asarray(a_scale, np.float64), 128, axis=1)
    b = np.asarray(b_q, np.float64) * np.repeat(np.asarray(b_scale, np.float64), 128, axis=1)
    expected = _tgmm_oracle(a.T, b.T, sizes)   # per-128-row promotion is exact here: scales factor out per tile
    np.testing.assert_allclose(np.asarray(dw), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_tgmm_fp8_rejects_unaligned_groups():
    q = jnp.zeros((128, 256), jnp.float8_e4m3fn)
    s = jnp.ones((128, 2), jnp.float32)
    with pytest.raises(ValueError, match="multiples of 128"):
        gpu.tgmm_fp8(q, s, q, s, jnp.asarray([100, 156], jnp.int32), out_dtype=jnp.float32, interpret=True)


def test_tiling_errors_name_the_field():
    x = jnp.zeros((128, 128), jnp.bfloat16)
    w = jnp.zeros((2, 128, 128), jnp.bfloat16)
    sizes = jnp.asarray([64, 64], jnp.int32)
    with pytest.raises(ValueError, match="block_k must be 128"):
        gpu.gmm_fp8(x.astype(jnp.float8_e4m3fn), jnp.ones((128, 1)), w.astype(jnp.float8_e4m3fn),
                    jnp.ones((2, 1, 1)), sizes, out_dtype=jnp.bfloat16,
                    tiling=GpuTiling(block_m=128, block_n=128, block_k=64, stages=4, wg_split="m"))
    with pytest.raises(ValueError, match="stages"):
        gpu.gmm(x, w, sizes, out_dtype=jnp.bfloat16,
                tiling=GpuTiling(block_m=128, block_n=256, block_k=64, stages=8))
    with pytest.raises(ValueError, match="x_NC must be bfloat16"):
        gpu.gmm(x.astype(jnp.float32), w, sizes, out_dtype=jnp.float32)


# DeepSeek-V3 routed experts: 32 groups x 1024 rows, hidden 7168 -> expert intermediate 2048.
G, ROWS, K_DS, N_DS = 32, 1024, 7168, 2048
_S = jax.ShapeDtypeStruct
_BF16, _FP8, _F32 = jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32
_LOWERING_CASES = {
    "gmm": (functools.partial(gpu.gmm, out_dtype=_BF16),
            (_S((G * ROWS, K_DS), _BF16), _S((G, K_DS, N_DS), _BF16))),
    # float32 output: the default tiling's epilogue is cut into column chunks to fit shared memory.
    "gmm_f32_out": (functools.partial(gpu.gmm, out_dtype=_F32),
                    (_S((G * ROWS, K_DS), _BF16), _S((G, K_DS, N_DS), _BF16))),
    "gmm_t": (functools.partial(gpu.gmm_t, out_dtype=_BF16),
              (_S((G * ROWS, N_DS), _BF16), _S((G, K_DS, N_DS), _BF16))),
    "tgmm": (functools.partial(gpu.tgmm, out_dtype=_F32),
             (_S((G * ROWS, K_DS), _BF16), _S((G * ROWS, N_DS), _BF16))),
    "gmm_fp8": (functools.partial(gpu.gmm_fp8, out_dtype=_BF16),
                (_S((G * ROWS, K_DS), _FP8), _S((G * ROWS, K_DS // 128), _F32), _S((G, N_DS, K_DS), _FP8),
                 _S((G, N_DS // 128, K_DS // 128), _F32))),
    "tgmm_fp8": (functools.partial(gpu.tgmm_fp8, out_dtype=_F32),
                 (_S((K_DS, G * ROWS), _FP8), _S((K_DS, G * ROWS // 128), _F32), _S((N_DS, G * ROWS), _FP8),
                  _S((N_DS, G * ROWS // 128), _F32))),
}


@pytest.mark.parametrize("name", sorted(_LOWERING_CASES))
def test_lowers_for_cuda_at_deepseek_shapes(name):
    fn, operands = _LOWERING_CASES[name]
    lowered = jax.jit(fn).trace(*operands, _S((G,), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
