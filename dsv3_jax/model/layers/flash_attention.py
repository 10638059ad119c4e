"""Blockwise causal attention in plain JAX (any backend): MLA's attention core without the (B, H, T, S) scores, an
online softmax forward and a recomputing custom VJP, in a few (B, H, block, block) float32 tiles of extra memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 512


def flash_attention(q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA, scale: float, segment_ids_BT=None,
                    block: int = DEFAULT_BLOCK):
    """(B, T, H, Dv) causal softmax(q·kᵀ·scale)·v, keys restricted to the query's segment when segment ids are given;
    in v's dtype. T is padded up to a multiple of the block (padded keys lie after every real query).

    Queries and keys come split as MLA makes them, [nope ; rope] with one rope key head shared by all heads, so the
    scores are q_nope·k_nope + q_rope·k_rope, each in float32, exactly as the xla core forms them. Peak extra memory
    is a few (B, H, block, block) float32 tiles instead of the whole score matrix."""
    B, T = q_nope_BTHU.shape[:2]
    block = min(block, T)
    pad = -T % block
    q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA = (
        pad_sequence(x, pad) for x in (q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA))
    if segment_ids_BT is None:
        segment_ids_BT = jnp.zeros((B, T), jnp.int32)
    segment_ids_BT = pad_sequence(segment_ids_BT, pad, -1)
    out_BTHA = _flash(q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA, segment_ids_BT, scale, block)
    return out_BTHA[:, :T]


def pad_sequence(x, pad: int, value=0):
    """x with `pad` more positions of `value` at the end of axis 1 (the sequence)."""
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _block(x, i, size: int):
    """Rows [i·size, (i+1)·size) of axis 1."""
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _scores(q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, scale):
    """(B, H, t, s) float32 scaled scores of a query block against a key block."""
    nope = jnp.einsum("bthu,bshu->bhts", q_nope_BTHU, k_nope_BSHU, preferred_element_type=jnp.float32)
    rope = jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR, preferred_element_type=jnp.float32)
    return (nope + rope) * scale


def _visible(i, j, block: int, seg_q_Bt, seg_k_Bs):
    """(B, 1, t, s) boolean: key position <= query position and the same segment, for query block i, key block j."""
    q_pos = i * block + jnp.arange(block)
    k_pos = j * block + jnp.arange(block)
    causal_ts = q_pos[:, None] >= k_pos[None, :]
    return causal_ts[None, None] & (seg_q_Bt[:, None, :, None] == seg_k_Bs[:, None, None, :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q_nope, q_rope, k_nope, k_rope, v, segment_ids_BT, scale, block):
    return _forward(q_nope, q_rope, k_nope, k_rope, v, segment_ids_BT, scale, block)[0]


def _forward(q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA, segment_ids_BT, scale, block):
    """(out_BTHA in v's dtype, lse_BHT float32; +inf on a row that sees no key, whose output is zero).

    Walks query blocks and, inside each, the key blocks up to the diagonal, with an online softmax (running max m,
    running sum l, float32 accumulator); it keeps only the output and the per-row log-sum-exp."""
    B, T, H, _ = q_nope_BTHU.shape
    Dv = v_BSHA.shape[-1]

    def query_block(i):
        q_n, q_r, seg_q = _block(q_nope_BTHU, i, block), _block(q_rope_BTHR, i, block), _block(segment_ids_BT, i, block)

        def key_block(j, carry):
            m_BHt, l_BHt, acc_BHtA = carry
            s_BHts = _scores(q_n, q_r, _block(k_nope_BSHU, j, block), _block(k_rope_BSR, j, block), scale)
            visible = _visible(i, j, block, seg_q, _block(segment_ids_BT, j, block))
            s_BHts = jnp.where(visible, s_BHts, -jnp.inf)
            m_new = jnp.maximum(m_BHt, jnp.max(s_BHts, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p_BHts = jnp.exp(s_BHts - m_safe[..., None])
            alpha_BHt = jnp.exp(m_BHt - m_safe)
            pv_BHtA = jnp.einsum("bhts,bsha->bhta", p_BHts.astype(v_BSHA.dtype), _block(v_BSHA, j, block),
                                 preferred_element_type=jnp.float32)
            return m_new, alpha_BHt * l_BHt + p_BHts.sum(-1), alpha_BHt[..., None] * acc_BHtA + pv_BHtA

        init = (jnp.full((B, H, block), -jnp.inf, jnp.float32), jnp.zeros((B, H, block), jnp.float32),
                jnp.zeros((B, H, block, Dv), jnp.float32))
        m_BHt, l_BHt, acc_BHtA = jax.lax.fori_loop(0, i + 1, key_block, init)   # causal: up to the diagonal
        out_BHtA = acc_BHtA / jnp.maximum(l_BHt, 1e-30)[..., None]
        lse_BHt = jnp.where(l_BHt > 0, m_BHt + jnp.log(jnp.maximum(l_BHt, 1e-30)), jnp.inf)
        return out_BHtA.transpose(0, 2, 1, 3).astype(v_BSHA.dtype), lse_BHt

    out_TbBtHA, lse_TbBHt = jax.lax.map(query_block, jnp.arange(T // block))
    out_BTHA = out_TbBtHA.transpose(1, 0, 2, 3, 4).reshape(B, T, H, Dv)
    lse_BHT = lse_TbBHt.transpose(1, 2, 0, 3).reshape(B, H, T)
    return out_BTHA, lse_BHT


def _flash_fwd(q_nope, q_rope, k_nope, k_rope, v, segment_ids_BT, scale, block):
    out, lse = _forward(q_nope, q_rope, k_nope, k_rope, v, segment_ids_BT, scale, block)
    return out, (q_nope, q_rope, k_nope, k_rope, v, segment_ids_BT, out, lse)


def _flash_bwd(scale, block, residuals, dout_BTHA):
    """Walks key blocks and, inside each, the query blocks from the diagonal on, recomputing each block's
    probabilities from the saved log-sum-exp: dV_j += Pᵀ dO, dS = P (dO Vᵀ − rowsum(dO·O)), dK_j += dSᵀ Q,
    dQ_i += dS K."""
    q_nope_BTHU, q_rope_BTHR, k_nope_BSHU, k_rope_BSR, v_BSHA, segment_ids_BT, out_BTHA, lse_BHT = residuals
    n_blocks = q_nope_BTHU.shape[1] // block
    delta_BHT = jnp.einsum("btha,btha->bht", dout_BTHA.astype(jnp.float32), out_BTHA.astype(jnp.float32))
    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)

    def key_block(j, grads):
        dq_n, dq_r, dk_n, dk_r, dv = grads
        k_n, k_r, v_j, seg_k = (_block(x, j, block) for x in (k_nope_BSHU, k_rope_BSR, v_BSHA, segment_ids_BT))

        def query_block(i, acc):
            dq_n, dq_r, dk_n_j, dk_r_j, dv_j = acc
            q_n, q_r, do_i, seg_q = (_block(x, i, block) for x in (q_nope_BTHU, q_rope_BTHR, dout_BTHA,
                                                                    segment_ids_BT))
            lse_BHt = jax.lax.dynamic_slice_in_dim(lse_BHT, i * block, block, axis=2)
            delta_BHt = jax.lax.dynamic_slice_in_dim(delta_BHT, i * block, block, axis=2)
            s_BHts = _scores(q_n, q_r, k_n, k_r, scale)
            visible = _visible(i, j, block, seg_q, seg_k)
            p_BHts = jnp.where(visible, jnp.exp(s_BHts - lse_BHt[..., None]), 0.0)
            dv_j = dv_j + jnp.einsum("bhts,btha->bsha", p_BHts.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp_BHts = jnp.einsum("btha,bsha->bhts", do_i, v_j, preferred_element_type=jnp.float32)
            ds_BHts = p_BHts * (dp_BHts - delta_BHt[..., None]) * scale
            ds = ds_BHts.astype(q_n.dtype)
            dk_n_j = dk_n_j + jnp.einsum("bhts,bthu->bshu", ds, q_n, preferred_element_type=jnp.float32)
            dk_r_j = dk_r_j + jnp.einsum("bhts,bthr->bsr", ds, q_r, preferred_element_type=jnp.float32)
            add_rows = lambda full, rows: jax.lax.dynamic_update_slice_in_dim(
                full, _block(full, i, block) + rows, i * block, axis=1)
            dq_n = add_rows(dq_n, jnp.einsum("bhts,bshu->bthu", ds, k_n, preferred_element_type=jnp.float32))
            dq_r = add_rows(dq_r, jnp.einsum("bhts,bsr->bthr", ds, k_r, preferred_element_type=jnp.float32))
            return dq_n, dq_r, dk_n_j, dk_r_j, dv_j

        init = (dq_n, dq_r, f32(k_n), f32(k_r), f32(v_j))
        dq_n, dq_r, dk_n_j, dk_r_j, dv_j = jax.lax.fori_loop(j, n_blocks, query_block, init)   # causal: from the diagonal
        put = lambda full, rows: jax.lax.dynamic_update_slice_in_dim(full, rows, j * block, axis=1)
        return dq_n, dq_r, put(dk_n, dk_n_j), put(dk_r, dk_r_j), put(dv, dv_j)

    grads = jax.lax.fori_loop(0, n_blocks, key_block, tuple(map(f32, (q_nope_BTHU, q_rope_BTHR, k_nope_BSHU,
                                                                       k_rope_BSR, v_BSHA))))
    dq_n, dq_r, dk_n, dk_r, dv = grads
    cast = lambda g, x: g.astype(x.dtype)
    return (cast(dq_n, q_nope_BTHU), cast(dq_r, q_rope_BTHR), cast(dk_n, k_nope_BSHU), cast(dk_r, k_rope_BSR),
            cast(dv, v_BSHA), None)


_flash.defvjp(_flash_fwd, _flash_bwd)
