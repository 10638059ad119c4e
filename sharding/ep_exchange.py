"""The expert exchange as DeepEP runs it: a token travels once per destination node, then once per destination rank
inside the node, never once per chosen expert; results come back the same way, summed at each hop (`exchange_ffn`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

import jax_compat

# The name scope of the loops over rounds past the first: balanced routing runs none of them (compile-time estimates
# price them at 0 trips, experiments.estimate).
SKEW_ONLY_SCOPE = "skew_only_rounds"

# Stats vector entries, combined over rounds by max (ROUNDS, PEAK) or sum (the rest).
ROUNDS, RECEIVED, PEAK, OVERFLOW, DROPPED = range(5)

# Replayed rounds (past the first, and every round of a hop inside one) move capacity / REPLAY_FRACTION rows per
# pair: XLA allocates a loop's buffers whether or not it runs, and balanced routing never runs these.
REPLAY_FRACTION = 8


class Window(NamedTuple):
    """Round r covers rows [base + (r − start)·size, base + (r − start + 1)·size) of each sender's list."""
    base: int
    start: int
    size: int


class Hop(NamedTuple):
    size: int                                  # G: ranks in one group of the hop
    groups: tuple[tuple[int, ...], ...] | None  # axis_index_groups of the expert axis; None: the whole axis
    span: int                                  # experts per destination unit (node or rank)
    capacity: int                              # C: rows per (sender, receiver) pair per round
    intra_node: bool = False                   # its groups are whole nodes (consecutive ranks): the fast links


@dataclasses.dataclass(frozen=True)
class Exchange:
    axis: str
    e_local: int                       # experts per rank
    hops: tuple[Hop, ...]
    expert_rows: int                   # rows of one expert pass on the owning rank (grouped matmul buffer)
    expert_ffn: Callable               # (x_ND, group_sizes_e, *expert_weights) -> y_ND, rows contiguous by expert
    all_to_all: Callable = lax.all_to_all   # the transport of a hop over the whole axis
    # The transport of a hop inside nodes: (x, axis, split, concat, group_size=G) among each G consecutive ranks.
    node_all_to_all: Callable | None = None
    codec: tuple[Callable, Callable] | None = None
    max_rounds: int | None = None
    recompute: bool = False


def hops_for(ep: int, node_size: int, e_local: int, capacities: tuple[int, ...]) -> tuple[Hop, ...]:
    """The hops of an expert axis of `ep` ranks in nodes of `node_size`, with `capacities` (one per hop)."""
    nodes = ep // node_size
    if nodes == 1 or node_size == 1:
        return (Hop(ep, None, e_local, capacities[0], intra_node=nodes == 1),)
    inter = tuple(tuple(n * node_size + l for n in range(nodes)) for l in range(node_size))
    intra = tuple(tuple(n * node_size + l for l in range(node_size)) for n in range(nodes))
    return (Hop(nodes, inter, e_local * node_size, capacities[0]),
            Hop(node_size, intra, e_local, capacities[1], intra_node=True))


def _vary_like(x, ref):
    return jax_compat.cast_varying(x, jax_compat.varying_axes(ref))


def _combine_stats(a, b):
    return jnp.stack([jnp.maximum(a[ROUNDS], b[ROUNDS]), a[RECEIVED] + b[RECEIVED], jnp.maximum(a[PEAK], b[PEAK]),
                      a[OVERFLOW] + b[OVERFLOW], a[DROPPED] + b[DROPPED]])


# ---- rounds: round 0 differentiated as written, later ones replayed in the backward ----------------------------

def _schedule(need, capacity: int, keep: bool, small: bool, max_rounds: int | None = None):
    """(rounds, rows they cover, the windows of the first and of the later rounds) for a sender list of `need` rows
    at most. keep: round 0 moves `capacity` rows, later ones capacity / REPLAY_FRACTION; not keep: all the latter
    when `small` (inside a skew-only loop), else all `capacity`."""
    replay = max(1, -(-capacity // REPLAY_FRACTION)) if (keep or small) else capacity
    if keep:
        rounds = 1 + (jnp.maximum(need - capacity, 0) + replay - 1) // replay
    else:
        rounds = (need + replay - 1) // replay
    if max_rounds is not None:
        rounds = jnp.minimum(rounds, max_rounds)
    rounds = rounds.astype(jnp.int32)
    if keep:
        return rounds, capacity + (rounds - 1) * replay, Window(0, 0, capacity), Window(capacity, 1, replay)
    return rounds, rounds * replay, None, Window(0, 0, replay)


def _rounds_sum(make_round, rounds, ints, floats, keep: bool, small: bool, out_rows: int, first: Window,
                later: Window):
    """Σ_{r < rounds} round(r) -> (out [out_rows, D] float32, stats), round = make_round(keep_inner, small_inner,
    window). keep: round 0 runs as written (its backward keeps its residuals; every rank takes part in its
    collectives even with nothing to send) and rounds past it run in a loop whose backward replays each round (skew
    only); the rounds of inner hops inside that loop all replay, in small windows (keep=False, small=True), so a
    replayed round holds one small round of buffers per hop. Not keep: every round in the replaying loop."""
    if keep:
        out = make_round(True, False, first)(jnp.int32(0), ints, floats)
        return _replayed_rounds(make_round(False, True, later), 1, rounds, ints, floats, out)
    x = jax.tree.leaves(floats)[0]
    init = (_vary_like(jnp.zeros((out_rows, x.shape[-1]), jnp.float32), x),
            _vary_like(jnp.zeros((5,), jnp.int32), x))
    return _replayed_rounds(make_round(False, small, later), 0, rounds, ints, floats, init)


def _loop(start: int, rounds, body, init):
    def step(carry):
        r, value = carry
        return r + 1, body(r, value)
    scope = SKEW_ONLY_SCOPE if start else "rounds"
    with jax.named_scope(scope):
        return lax.while_loop(lambda carry: carry[0] < rounds, step, (jnp.int32(start), init))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _replayed_rounds(round_fn, start: int, rounds, ints, floats, acc):
    """acc + Σ_{start <= r < rounds} round_fn(r, ints, floats); the backward recomputes each round."""
    def body(r, acc):
        out, stats = round_fn(r, ints, floats)
        return acc[0] + out, _combine_stats(acc[1], stats)
    return _loop(start, rounds, body, acc)


def _replayed_rounds_fwd(round_fn, start, rounds, ints, floats, acc):
    return _replayed_rounds(round_fn, start, rounds, ints, floats, acc), (rounds, ints, floats)


def _replayed_rounds_bwd(round_fn, start, residuals, cotangent):
    rounds, ints, floats = residuals
    d_out, d_stats = cotangent

    def body(r, d_floats):
        _, pullback, _ = jax.vjp(lambda f: round_fn(r, ints, f), floats, has_aux=True)
        (d,) = pullback(d_out)
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_floats, d)

    init = jax.tree.map(lambda a: _vary_like(jnp.zeros(a.shape, jnp.float32), a), floats)
    d_floats = jax.tree.map(lambda g, a: g.astype(a.dtype), _loop(start, rounds, body, init), floats)
    float0 = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), tree)
    return float0(rounds), float0(ints), d_floats, (d_out, d_stats)


_replayed_rounds.defvjp(_replayed_rounds_fwd, _replayed_rounds_bwd)


# ---- moving rows --------------------------------------------------------------------------------------------------

def _move(ex: Exchange, hop: Hop, x_GX, transport=None):
    """Block g of x_GX to the group's rank g; the result's block g came from rank g (its own transpose). Rows go by
    ex.node_all_to_all inside nodes where there is one, else by ex.all_to_all over the whole axis; across nodes over
    part of the axis, or with `transport=lax.all_to_all`, by lax's."""
    if transport is None and hop.intra_node and ex.node_all_to_all is not None:
        return ex.node_all_to_all(x_GX, ex.axis, 0, 0, group_size=hop.size)
    if hop.groups is None:
        return (transport or ex.all_to_all)(x_GX, ex.axis, 0, 0)
    return lax.all_to_all(x_GX, ex.axis, 0, 0, axis_index_groups=[list(g) for g in hop.groups])


def _encoded_move(ex: Exchange, hop: Hop, x_GCD):
    """x_GCD moved in the codec's format (or as is), back in x's dtype."""
    if ex.codec is None:
        return _move(ex, hop, x_GCD)
    encode, decode = ex.codec
    g, c, d = x_GCD.shape
    payload = encode(x_GCD.reshape(g * c, d))
    moved = tuple(_move(ex, hop, a.reshape(g, c, *a.shape[1:])).reshape(a.shape) for a in payload)
    return decode(moved, x_GCD.dtype).reshape(g, c, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dispatch(ex: Exchange, hop: Hop, x_GCD):
    """Rows toward the experts: in the codec's format; the input gradient comes back as is."""
    return _encoded_move(ex, hop, x_GCD)


_dispatch.defvjp(lambda ex, hop, x: (_dispatch(ex, hop, x), None),
                 lambda ex, hop, _, dy: (_move(ex, hop, dy),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine(ex: Exchange, hop: Hop, y_GCD):
    """Results back to the rows' senders, as is; the output gradient travels toward the experts in the codec's
    format (its backward is a dispatch)."""
    return _move(ex, hop, y_GCD)


_combine.defvjp(lambda ex, hop, y: (_combine(ex, hop, y), None),
                lambda ex, hop, _, dy: (_encoded_move(ex, hop, dy),))


# ---- one hop ------------------------------------------------------------------------------------------------------

def _hop(ex: Exchange, level: int, x_MD, ids_MK, w_MK, expert_w, keep: bool, small: bool):
    """Σ over this hop's destinations of the next level's partial sums: rows x_MD with their expert ids ids_MK (-1:
    not for this rank to route) and gate weights w_MK -> (out_MD float32, stats)."""
    hop = ex.hops[level]
    g_size, c = hop.size, hop.capacity
    m = x_MD.shape[0]
    unit_MK = jnp.where(ids_MK >= 0, (ids_MK // hop.span) % g_size, -1)
    choices_GM = (unit_MK[None] == jnp.arange(g_size, dtype=unit_MK.dtype)[:, None, None]).sum(-1)
    has_GM = choices_GM > 0
    count_G = has_GM.sum(axis=1).astype(jnp.int32)
    order_GM = jnp.argsort(~has_GM, axis=1, stable=True).astype(jnp.int32)   # each unit's rows first, in order
    need = lax.pmax(jnp.max(count_G), ex.axis)   # every rank runs the same rounds: they hold collectives
    rounds, covered, first, later = _schedule(need, c, keep, small, ex.max_rounds)
    # Choices of the rows no round sends (only when max_rounds caps the rounds): dropped.
    unsent_GM = jnp.arange(m)[None, :] >= covered
    dropped = (jnp.take_along_axis(choices_GM, order_GM, axis=1) * unsent_GM).sum().astype(jnp.int32)

    def make_round(keep_inner: bool, small_inner: bool, window: Window):
        return functools.partial(_hop_round, ex, level, keep_inner, small_inner, window)

    out_MD, stats = _rounds_sum(make_round, rounds, (order_GM, count_G, unit_MK, ids_MK, rounds),
                                (x_MD, w_MK, expert_w), keep, small, m, first, later)
    return out_MD, stats.at[DROPPED].add(dropped)


def _hop_round(ex: Exchange, level: int, keep: bool, small: bool, window: Window, r, ints, floats):
    """Round r of hop `level`: the window's rows to each peer, the next level on what arrives, the results back."""
    hop = ex.hops[level]
    g_size, c = hop.size, window.size
    order_GM, count_G, unit_MK, ids_MK, rounds = ints
    m = ids_MK.shape[0]
    x_MD, w_MK, expert_w = floats
    pos_GC = window.base + (r - window.start) * c + jnp.arange(c, dtype=jnp.int32)[None, :]
    valid_GC = pos_GC < count_G[:, None]
    m_GC = jnp.take_along_axis(order_GM, jnp.minimum(pos_GC, m - 1), axis=1)
    mine_GCK = valid_GC[..., None] & (unit_MK[m_GC] == jnp.arange(g_size)[:, None, None])
    x_GCD = jnp.where(valid_GC[..., None], x_MD[m_GC], 0).astype(x_MD.dtype)
    recv_ids = _move(ex, hop, jnp.where(mine_GCK, ids_MK[m_GC], -1), lax.all_to_all)
    recv_w = _move(ex, hop, jnp.where(mine_GCK, w_MK[m_GC], 0), lax.all_to_all)
    recv_x = _dispatch(ex, hop, x_GCD)
    rows = g_size * c
    y_RD, stats = _route(ex, level + 1, recv_x.reshape(rows, -1), recv_ids.reshape(rows, -1),
                         recv_w.reshape(rows, -1), expert_w, keep, small)
    back_GCD = _combine(ex, hop, y_RD.astype(x_MD.dtype).reshape(g_size, c, -1))
    dest_N = jnp.where(valid_GC, m_GC, m).reshape(-1)
    out_MD = jnp.zeros((m, back_GCD.shape[-1]), jnp.float32)
    out_MD = out_MD.at[dest_N].add(back_GCD.reshape(rows, -1).astype(jnp.float32), mode="drop")
    overflow = (valid_GC & (pos_GC >= hop.capacity)).sum().astype(jnp.int32)   # past one full round
    here = jnp.stack([rounds, jnp.int32(0), jnp.int32(0), overflow, jnp.int32(0)])
    return out_MD, _combine_stats(stats, here)


def _route(ex: Exchange, level: int, x_MD, ids_MK, w_MK, expert_w, keep: bool, small: bool):
    if level < len(ex.hops):
        return _hop(ex, level, x_MD, ids_MK, w_MK, expert_w, keep, small)
    return _own_experts(ex, x_MD, ids_MK, w_MK, expert_w, keep, small)


# ---- the owning rank's experts ------------------------------------------------------------------------------------

def _own_experts(ex: Exchange, x_RD, ids_RK, w_RK, expert_w, keep: bool, small: bool):
    """Each received row through every one of its experts on this rank, weighted and summed per row -> (out_RD
    float32, stats). The (row, expert) pairs run in passes of `expert_rows`, grouped by expert (a local loop)."""
    r_rows, k = ids_RK.shape
    e_local, x_rows = ex.e_local, ex.expert_rows
    first_expert = lax.axis_index(ex.axis) * e_local
    local_N = jnp.where(ids_RK >= 0, ids_RK - first_expert, e_local).reshape(-1).astype(jnp.int32)
    order_N = jnp.argsort(local_N, stable=True).astype(jnp.int32)
    pairs = (local_N < e_local).sum().astype(jnp.int32)
    passes, _, first, later = _schedule(pairs, x_rows, keep, small)
    filled = (ids_RK >= 0).any(axis=1).sum().astype(jnp.int32)

    def make_round(_keep_inner: bool, _small_inner: bool, window: Window):
        return functools.partial(_expert_pass, ex, window)

    return _rounds_sum(make_round, passes, (order_N, local_N, pairs, filled), (x_RD, w_RK, expert_w), keep, small,
                       r_rows, first, later)


def _expert_pass(ex: Exchange, window: Window, p, ints, floats):
    """Pass p over this rank's (row, expert) pairs, the window's of them, grouped by expert."""
    e_local, x_rows = ex.e_local, window.size
    order_N, local_N, pairs, filled = ints
    x_RD, w_RK, expert_w = floats
    r_rows, k = w_RK.shape
    pos_X = window.base + (p - window.start) * x_rows + jnp.arange(x_rows, dtype=jnp.int32)
    valid_X = pos_X < pairs
    pair_X = order_N[jnp.minimum(pos_X, order_N.shape[0] - 1)]
    row_X = pair_X // k
    sizes_e = jnp.bincount(jnp.where(valid_X, local_N[pair_X], e_local), length=e_local + 1)[:e_local]
    y_XD = ex.expert_ffn(x_RD[row_X], sizes_e.astype(jnp.int32), *expert_w)
    gate_X = jnp.where(valid_X, w_RK.reshape(-1)[pair_X], 0).astype(jnp.float32)
    out_RD = jnp.zeros((r_rows, y_XD.shape[-1]), jnp.float32)
    out_RD = out_RD.at[jnp.where(valid_X, row_X, r_rows)].add(y_XD.astype(jnp.float32) * gate_X[:, None],
                                                               mode="drop")
    stats = jnp.stack([jnp.int32(0), valid_X.sum().astype(jnp.int32), jnp.where(p == 0, filled, 0),
                       jnp.int32(0), jnp.int32(0)])
    return out_RD, stats


def exchange_ffn(ex: Exchange, x_TD, experts_TK, weights_TK, expert_weights: tuple):
    """Σ_k weights_TK · expert_{experts_TK}(x_TD) for this rank's tokens (inside a shard_map where ex.axis is manual;
    `expert_weights` hold this rank's E/EP experts, expert axis first) -> (out_TD float32, stats int32[5]).

    A token crosses the slow link once per destination node, then fans out on the fast links inside the node.

    Hops, for an expert axis of EP ranks in nodes of L (N = EP/L nodes; rank i is node i // L, local rank i % L):
      inter-node  each token goes once to every node holding one of its experts, to the rank there with its own local
                  index (an all_to_all among the N ranks of equal local index);
      intra-node  that rank forwards the row once to every rank of its node holding one of the row's experts (an
                  all_to_all among the node's L ranks);
      experts     the owning rank runs each row through every one of its experts the token chose and returns one
                  weighted partial sum per row.
    One node (N = 1) or one rank per node (L = 1) is one hop over the whole axis. A row carries the token's expert ids
    and gate weights for its destination only (-1 and 0 elsewhere); partial sums are added in float32.

    Buffers are bounded and nothing is dropped: each hop moves at most C rows per (sender, receiver) pair per round
    (ep_buffers.exchange_buffers sizes C from the expected distinct destinations per token), and skew adds rounds.
    Round 0 of every hop is differentiated as written, so its backward keeps its residuals (the received rows, the
    experts' activations) and sends only the output gradient out and the input gradient back; later rounds (skewed
    routing only) move capacity / REPLAY_FRACTION rows and replay their forward in the backward. `recompute=True`
    replays every round in the backward instead (rows travel again and the experts run again; only the layer's
    inputs are kept: the smallest memory).

    A `codec` (encode(x_ND) -> payload arrays, decode(payload, dtype) -> x_ND) puts dispatched rows on the wire in
    another format, e.g. FP8 with 1×128 scales; the backward's rows toward the experts (the output gradient) use it too,
    and results and input gradients travel in the activations' dtype.
    """
    expert_w = tuple(_vary_like(a, x_TD) for a in expert_weights)   # so their gradients sum over token shards
    return _route(ex, 0, x_TD, experts_TK.astype(jnp.int32), weights_TK, expert_w, not ex.recompute, False)
