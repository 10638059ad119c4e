"""Expert parallelism: E/EP experts per rank; token rows travel to their experts and back in bounded, dropless rounds
(the steps: `expert_parallel_ffn_local`; the options: `ExchangeOptions`; over a mesh: `expert_parallel_ffn`). The
default transport is sharding.ep_exchange's deduplicated, node-limited exchange; the ragged ones live here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

import jax_compat
from sharding import ep_exchange
from sharding.ep_buffers import capacity_per_peer, exchange_buffers
from sharding.ep_collectives import ragged_all_to_all_reference
from sharding.ep_layout import check_expert_parallel
from sharding.mesh import BATCH_AXES


class EPStats(NamedTuple):
    """Per token shard (one entry per rank of the token axes × expert axis), int32."""
    rounds: jax.Array          # exchange rounds run
    rows_received: jax.Array   # rows this rank's experts computed: its load
    peak_rows: jax.Array       # filled rows of the fullest round's receive buffer (round 0)
    overflow_rows: jax.Array   # rows past round 0, delivered in later rounds (not dropped)
    dropped_rows: jax.Array    # rows never computed; 0 unless max_rounds caps the rounds
    buffer_rows: jax.Array     # rows of the receive buffer of one round, EP·C


@dataclasses.dataclass(frozen=True)
class _Exchange:
    axis: str
    ep: int
    capacity: int                 # C: rows per (sender, receiver) pair per round
    impl: str
    expert_ffn: Callable          # (x_ND, group_sizes_e, *expert_weights) -> y_ND, rows contiguous by expert

    @property
    def ragged_collective(self):
        """lax.ragged_all_to_all, or its reference (an all_gather emulation)."""
        return lax.ragged_all_to_all if self.impl == "ragged" else ragged_all_to_all_reference


class _Plan(NamedTuple):
    send_start_P: jax.Array       # where my rows for rank r start in my sorted rows
    send_count_P: jax.Array       # how many rows I send to rank r
    recv_count_P: jax.Array       # how many rows rank r sends me
    recv_cum_PE: jax.Array        # inclusive cumsum over my local experts of the rows rank r sends me
    recv_start_P: jax.Array       # where rank r's rows for me start in its sorted rows
    rounds: jax.Array


def _vary_like(x, ref):
    """x typed device-varying over the mesh axes `ref` varies over, so its cotangent is summed over them once."""
    return jax_compat.cast_varying(x, jax_compat.varying_axes(ref))


def _round_sizes(count_P, r, c):
    return jnp.clip(count_P - r * c, 0, c)


def _send(ex: _Exchange, plan: _Plan, rows_NX, r):
    """Round r's rows to their owners: [EP·C, X], C slots per source rank (unfilled slots are 0)."""
    c, p = ex.capacity, rows_NX.shape[1]
    sizes_P = _round_sizes(plan.send_count_P, r, c)
    offsets_P = plan.send_start_P + jnp.minimum(r * c, plan.send_count_P)
    slot_P = jnp.full((ex.ep,), lax.axis_index(ex.axis) * c, jnp.int32)
    out_NX = jnp.zeros_like(rows_NX, shape=(ex.ep * c, p))
    return ex.ragged_collective(rows_NX, out_NX, offsets_P, sizes_P, slot_P,
                                _round_sizes(plan.recv_count_P, r, c), axis_name=ex.axis)


def _send_back(ex: _Exchange, plan: _Plan, rows_NX, r, out_NX):
    """Round r's results back into the sorted rows `out_NX` they came from."""
    c = ex.capacity
    sizes_P = _round_sizes(plan.recv_count_P, r, c)
    slot_P = jnp.arange(ex.ep, dtype=jnp.int32) * c
    dest_P = plan.recv_start_P + jnp.minimum(r * c, plan.recv_count_P)
    return ex.ragged_collective(rows_NX, out_NX, slot_P, sizes_P, dest_P,
                                _round_sizes(plan.send_count_P, r, c), axis_name=ex.axis)


def _received_experts(ex: _Exchange, plan: _Plan, r):
    """Local expert of every slot of round r's buffer; E_local marks an empty slot."""
    pos_N = r * ex.capacity + jnp.arange(ex.capacity)
    ids_PN = jax.vmap(lambda cum_e: jnp.searchsorted(cum_e, pos_N, side="right"))(plan.recv_cum_PE)
    return ids_PN.reshape(-1).astype(jnp.int32)


def _experts(x_ND, ids_N, w: tuple, expert_ffn):
    """Each row through its local expert; rows with id E_local (empty slots) give 0."""
    e_local = w[0].shape[0]
    order_N = jnp.argsort(ids_N, stable=True)
    sizes_e = jnp.bincount(ids_N, length=e_local + 1)[:e_local].astype(jnp.int32)
    y_ND = expert_ffn(x_ND[order_N], sizes_e, *w)
    return jnp.zeros_like(y_ND).at[order_N].set(y_ND, unique_indices=True)


def _loop(rounds, body, init):
    def step(carry):
        r, value = carry
        return r + 1, body(r, value)
    return lax.while_loop(lambda carry: carry[0] < rounds, step, (jnp.int32(0), init))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _exchange_ffn(ex: _Exchange, plan: _Plan, xs_ND, w: tuple):
    """Sorted rows through their experts on the owning ranks: ys_ND[n] = expert_{expert(n)}(xs_ND[n])."""
    def body(r, ys_ND):
        x_ND = _send(ex, plan, xs_ND, r)
        y_ND = _experts(x_ND, _received_experts(ex, plan, r), w, ex.expert_ffn)
        return _send_back(ex, plan, y_ND, r, ys_ND)
    return _loop(plan.rounds, body, jnp.zeros_like(xs_ND))


def _exchange_ffn_fwd(ex, plan, xs_ND, w):
    return _exchange_ffn(ex, plan, xs_ND, w), (plan, xs_ND, w)


def _exchange_ffn_bwd(ex, residuals, dys_ND):
    plan, xs_ND, w = residuals
    w = tuple(_vary_like(a, xs_ND) for a in w)   # already so when traced via expert_parallel_ffn_local; a guard
    d = xs_ND.shape[1]
    both_N2D = jnp.concatenate([xs_ND, dys_ND.astype(xs_ND.dtype)], axis=1)

    def body(r, carry):
        dxs_ND, dw = carry
        recv_N2D = _send(ex, plan, both_N2D, r)
        ids_N = _received_experts(ex, plan, r)
        _, vjp = jax.vjp(lambda x, *w_: _experts(x, ids_N, w_, ex.expert_ffn), recv_N2D[:, :d], *w)
        dx_ND, *dw_r = vjp(recv_N2D[:, d:])
        dw = tuple(a + b.astype(jnp.float32) for a, b in zip(dw, dw_r))
        return _send_back(ex, plan, dx_ND, r, dxs_ND), dw

    init = (jnp.zeros_like(xs_ND), tuple(jnp.zeros_like(a, dtype=jnp.float32) for a in w))
    dxs_ND, dw = _loop(plan.rounds, body, init)
    zero_plan = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), plan)
    return zero_plan, dxs_ND, tuple(g.astype(a.dtype) for g, a in zip(dw, w))


_exchange_ffn.defvjp(_exchange_ffn_fwd, _exchange_ffn_bwd)


@dataclasses.dataclass(frozen=True)
class ExchangeOptions:
    """How the routed experts' exchange runs (besides the mesh): the transport (`impl`), its buffers, the node size
    along the expert axis, the dispatch wire format and whether the backward recomputes the experts.

    impl: `all_to_all` — the deduplicated, node-limited exchange of sharding.ep_exchange (padded blocks, runs
          everywhere); `ragged` / `ragged_reference` — one row per (token, choice) moved with lax.ragged_all_to_all
          (GPU/TPU: XLA:CPU lowers but cannot compile it) or its all_gather emulation (a test oracle).
    node_size: ranks of the expert axis that share a node (the fast links); 0 or the axis size: one node.
    routing_groups: (n_group, topk_group) of the router, for the expected destinations per token that size the
          all_to_all buffers (ep_buffers.exchange_buffers).
    codec: (encode(x_ND) -> arrays, decode(arrays, dtype) -> x_ND) of dispatched rows on the wire (e.g. FP8 with
          1×128 scales), None: as they are.
    all_to_all: the collective of a hop over the whole expert axis (default lax.all_to_all; e.g. the Pallas TPU
          remote-DMA kernel). Hops over part of the axis use lax.all_to_all with axis_index_groups.
    node_all_to_all: the collective of a hop inside nodes, taking precedence there (e.g. the Mosaic GPU NVLink
          kernel): fn(x, axis, split, concat, group_size=G) exchanges among each G consecutive ranks of the axis.
    recompute: the backward replays the exchange (rows travel again, the experts run again) instead of keeping
          round 0's residuals: only the layer's inputs are kept."""
    impl: str = "all_to_all"
    capacity_factor: float = 1.25
    block_multiple: int = 8
    max_rounds: int | None = None
    node_size: int = 0
    routing_groups: tuple[int, int] = (1, 1)
    codec: tuple[Callable, Callable] | None = None
    all_to_all: Callable | None = None
    node_all_to_all: Callable | None = None
    recompute: bool = False


def expert_parallel_ffn_local(x_TD, experts_TK, weights_TK, expert_weights: tuple, *, expert_ffn: Callable,
                              expert_axis: str, options: ExchangeOptions = ExchangeOptions(),
                              out_dtype=None) -> tuple[jax.Array, EPStats]:
    """The per-rank body: call inside a shard_map where `expert_axis` is manual. x_TD and the routing are this
    rank's tokens; `expert_weights` (each expert-axis first) its E/EP local experts, which
    expert_ffn(x_ND, group_sizes_e, *expert_weights) runs on rows grouped by local expert. Stats are scalars.

    impl="all_to_all" (sharding.ep_exchange): a token travels once per destination node, then once per destination
    rank inside the node, carrying the ids and gate weights of its experts there; each rank returns one weighted
    partial sum per row and the partial sums are added in float32 on the way back. Bounded, dropless buffers
    (rounds for skew); the backward keeps round 0's residuals, so the experts are not recomputed and each direction
    moves one tensor (the output gradient out, the input gradient back).

    The ragged transports move every (token, choice) row:
     1. Each rank sorts its T·K (token, choice) rows by expert (contiguous per rank, so grouped by destination).
     2. One small all_to_all gives every peer the per-local-expert row counts and where each block starts.
     3. Rows move in rounds of at most C ≈ capacity_factor · T·K / EP rows per (sender, receiver) pair
        (`ep_buffers.capacity_per_peer`); skew adds rounds (agreed by a pmax over the expert axis).
     4. Each round the owner runs its experts on the buffer and returns each result to the row it came from; the
        rows are un-sorted and combined with the weights in float32.
     5. The backward replays the rounds (x and dy rows travel together, dx comes back), recomputing the experts.
    """
    o = options
    if (o.all_to_all is not None or o.node_all_to_all is not None) and o.impl != "all_to_all":
        raise ValueError(f"expert_parallel.all_to_all is a transport for impl='all_to_all', not impl={o.impl!r}")
    ep = lax.axis_size(expert_axis)
    (t, k), e_local = experts_TK.shape, expert_weights[0].shape[0]
    if o.impl == "all_to_all":
        return _deduplicated(x_TD, experts_TK, weights_TK, expert_weights, expert_ffn, expert_axis, ep, o,
                             out_dtype)
    c = capacity_per_peer(t * k, ep, o.capacity_factor, o.block_multiple)
    flat_N = experts_TK.reshape(-1).astype(jnp.int32)
    order_N = jnp.argsort(flat_N, stable=True)
    xs_ND = x_TD[order_N // k]

    counts_PE = jnp.bincount(flat_N, length=ep * e_local).reshape(ep, e_local).astype(jnp.int32)
    send_count_P = counts_PE.sum(axis=1)
    send_start_P = jnp.cumsum(send_count_P) - send_count_P
    got_PE = lax.all_to_all(jnp.concatenate([counts_PE, send_start_P[:, None]], axis=1), expert_axis, 0, 0)
    recv_counts_PE, recv_start_P = got_PE[:, :e_local], got_PE[:, e_local]
    rounds = lax.pmax(jnp.max((send_count_P + c - 1) // c), expert_axis)
    if o.max_rounds is not None:
        rounds = jnp.minimum(rounds, o.max_rounds)
    recv_count_P = recv_counts_PE.sum(axis=1)
    plan = _Plan(send_start_P, send_count_P, recv_count_P, jnp.cumsum(recv_counts_PE, axis=1), recv_start_P,
                 rounds.astype(jnp.int32))

    ex = _Exchange(expert_axis, ep, c, o.impl, expert_ffn)
    w = tuple(_vary_like(a, x_TD) for a in expert_weights)   # so weight grads psum over tokens
    ys_ND = _exchange_ffn(ex, plan, xs_ND, w)

    y_TKD = jnp.zeros_like(ys_ND).at[order_N].set(ys_ND, unique_indices=True).reshape(t, k, -1)
    out_TD = (y_TKD.astype(jnp.float32) * weights_TK.astype(jnp.float32)[..., None]).sum(axis=1)

    delivered_P = jnp.minimum(recv_count_P, rounds * c)
    stats = EPStats(rounds=plan.rounds,
                    rows_received=delivered_P.sum(),
                    peak_rows=jnp.minimum(recv_count_P, c).sum(),
                    overflow_rows=jnp.maximum(delivered_P - c, 0).sum(),
                    dropped_rows=(recv_count_P - delivered_P).sum(),
                    buffer_rows=jnp.int32(ep * c))
    return out_TD.astype(out_dtype or x_TD.dtype), stats


def _deduplicated(x_TD, experts_TK, weights_TK, expert_weights, expert_ffn, axis, ep, o: ExchangeOptions,
                  out_dtype):
    (t, k), n_experts = experts_TK.shape, expert_weights[0].shape[0] * ep
    node = o.node_size or ep
    n_group, topk_group = o.routing_groups
    b = exchange_buffers(t, n_experts, k, ep, node, n_group=n_group, topk_group=topk_group,
                         capacity_factor=o.capacity_factor, block_multiple=o.block_multiple)
    e_local = n_experts // ep
    ex = ep_exchange.Exchange(axis, e_local, ep_exchange.hops_for(ep, node, e_local, b.capacities), b.expert_rows,
                              expert_ffn, o.all_to_all or lax.all_to_all, o.node_all_to_all, o.codec, o.max_rounds,
                              o.recompute)
    out_TD, s = ep_exchange.exchange_ffn(ex, x_TD, experts_TK, weights_TK, tuple(expert_weights))
    last = ex.hops[-1]
    stats = EPStats(rounds=s[ep_exchange.ROUNDS], rows_received=s[ep_exchange.RECEIVED],
                    peak_rows=s[ep_exchange.PEAK], overflow_rows=s[ep_exchange.OVERFLOW],
                    dropped_rows=s[ep_exchange.DROPPED], buffer_rows=jnp.int32(last.size * last.capacity))
    return out_TD.astype(out_dtype or x_TD.dtype), stats


def token_shard_axes(mesh: Mesh, expert_axis: str = "expert", token_axes: tuple[str, ...] = BATCH_AXES):
    """The mesh axes that split the tokens, outermost first: the batch axes present, then `expert_axis`."""
    return tuple(a for a in token_axes if a in mesh.shape and a != expert_axis) + (expert_axis,)


def expert_parallel_ffn(x_TD, experts_TK, weights_TK, expert_weights: tuple, *, expert_ffn: Callable, mesh: Mesh,
                        expert_axis: str = "expert", token_axes: tuple[str, ...] = BATCH_AXES,
                        options: ExchangeOptions = ExchangeOptions(), out_dtype=None) -> tuple[jax.Array, EPStats]:
    """Σ_k weights_TK · expert_{experts_TK}(x_TD) with the experts' weights split over `expert_axis` of `mesh`;
    expert_ffn(x_ND, group_sizes_E, *expert_weights) computes the experts on rows grouped by expert.

    Tokens are split over `token_axes` then `expert_axis`; each of `expert_weights` (E first) over `expert_axis`,
    gathered over every other axis. Equals the single-device routed-expert output; dropless unless
    `options.max_rounds` is set. Returns out_TD and EPStats (each [token shards]). The exchange and its options:
    `expert_parallel_ffn_local`, ExchangeOptions.
    """
    o = options
    if expert_axis not in mesh.shape:
        raise ValueError(f"expert_parallel.expert_axis={expert_axis!r}: not an axis of the mesh "
                         f"({', '.join(mesh.axis_names)})")
    t, t2, n_experts = x_TD.shape[0], experts_TK.shape[0], expert_weights[0].shape[0]
    tok = token_shard_axes(mesh, expert_axis, token_axes)
    shards = 1
    for a in tok:
        shards *= mesh.shape[a]
    ep = mesh.shape[expert_axis]
    check_expert_parallel(n_experts, ep, impl=o.impl, capacity_factor=o.capacity_factor, tokens=t,
                          token_shards=shards, max_rounds=o.max_rounds, node_size=o.node_size)
    if t2 != t or weights_TK.shape != experts_TK.shape:
        raise ValueError(f"experts_TK {experts_TK.shape} and weights_TK {weights_TK.shape} must be [T={t}, K]")
    for i, w in enumerate(expert_weights):
        if w.shape[0] != n_experts:
            raise ValueError(f"expert_weights[{i}].shape={w.shape}: expected {n_experts} experts first, as "
                             f"expert_weights[0]")

    body = functools.partial(expert_parallel_ffn_local, expert_axis=expert_axis, options=o, expert_ffn=expert_ffn,
                             out_dtype=out_dtype)

    def per_rank(x_TD, experts_TK, weights_TK, expert_weights):
        out_TD, stats = body(x_TD, experts_TK, weights_TK, expert_weights)
        return out_TD, EPStats(*(jnp.reshape(s, (1,)) for s in stats))

    tokens = P(tok, None)
    experts = tuple(P(expert_axis) for _ in expert_weights)
    return jax.shard_map(per_rank, mesh=mesh, in_specs=(tokens, tokens, tokens, experts),
                         out_specs=(tokens, EPStats(*[P(tok)] * len(EPStats._fields))))(
        x_TD, experts_TK, weights_TK, tuple(expert_weights))
