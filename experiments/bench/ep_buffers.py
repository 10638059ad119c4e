"""Expert-parallel receive buffers: rows each rank receives per round under uniform and skewed routing, beside the
bounded per-round buffer and the single-shot worst case (sharding.ep_buffers). Baseline: the balanced size T·K.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments.bench import format_table, require_devices

NAME = "ep_buffers"
SUMMARY = "EP receive-buffer rows, uniform vs skewed routing, vs the balanced and worst-case sizes"
BASELINE = "balanced rows T_local·K"
DEVICES = 8
ROUTINGS = ("uniform", "skew90", "hot_rank")


def add_arguments(parser) -> None:
    parser.add_argument("--ep", type=int, nargs="+", default=[4, 8], help="expert-parallel sizes (default: %(default)s)")
    parser.add_argument("--tokens-per-rank", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--block-multiple", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=7168, help="row width for the byte sizes, bf16 (default: V3's)")
    parser.add_argument("--routing", nargs="+", default=list(ROUTINGS), choices=ROUTINGS)


def routing(kind: str, tokens: int, top_k: int, n_experts: int, ep: int, seed: int = 0) -> np.ndarray:
    """experts_TK for a named scenario: `uniform` (k distinct experts), `skew90` (each choice is expert 0 with
    probability 0.9, else uniform), `hot_rank` (k distinct experts among rank 0's E/EP)."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return np.argsort(rng.random((tokens, n_experts)), axis=1)[:, :top_k].astype(np.int32)
    if kind == "skew90":
        other = rng.integers(0, n_experts, (tokens, top_k))
        return np.where(rng.random((tokens, top_k)) < 0.9, 0, other).astype(np.int32)
    if kind == "hot_rank":
        local = n_experts // ep
        if top_k > local:
            raise ValueError(f"hot_rank routing needs top_k={top_k} <= n_experts/ep={local}")
        return np.argsort(rng.random((tokens, local)), axis=1)[:, :top_k].astype(np.int32)
    raise ValueError(f"routing kind={kind!r}: expected uniform, skew90 or hot_rank")


def measure_buffers(mesh, *, tokens_per_rank: int, top_k: int, n_experts: int, d_model: int = 32, d_ff: int = 32,
                    capacity_factor: float = 1.25, block_multiple: int = 8, impl: str = "all_to_all",
                    kinds=ROUTINGS, expert_axis: str = "expert") -> list[dict]:
    """Runs the exchange (forward, SwiGLU experts) once per routing scenario; one dict of row counts per scenario."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.model.moe.experts import swiglu_experts
    from pallas_kernels.grouped_matmul import grouped_matmul
    from sharding.ep_buffers import ep_buffer_size
    from sharding.expert_parallel import ExchangeOptions, expert_parallel_ffn, token_shard_axes

    ep = mesh.shape[expert_axis]
    tokens = tokens_per_rank * int(np.prod([mesh.shape[a] for a in token_shard_axes(mesh, expert_axis)]))
    sizes = ep_buffer_size(tokens_per_rank, top_k, n_experts, ep, capacity_factor=capacity_factor,
                           block_multiple=block_multiple, d_model=d_model, dtype="float32")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(tokens, d_model)), jnp.float32)
    w = tuple(jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32)
              for s in ((n_experts, d_model, d_ff), (n_experts, d_model, d_ff), (n_experts, d_ff, d_model)))
    weights = jnp.full((tokens, top_k), 1.0 / top_k, jnp.float32)
    expert_ffn = functools.partial(swiglu_experts, grouped_matmul=grouped_matmul)
    options = ExchangeOptions(impl=impl, capacity_factor=capacity_factor, block_multiple=block_multiple)
    run = jax.jit(lambda x, e, g, w: expert_parallel_ffn(x, e, g, w, expert_ffn=expert_ffn, mesh=mesh,
                                                         options=options, expert_axis=expert_axis))
    rows = []
    for kind in kinds:
        experts = routing(kind, tokens, top_k, n_experts, ep)
        _, stats = run(x, jnp.asarray(experts), weights, w)
        rows.append(dict(routing=kind, rounds=int(stats.rounds.max()),
                         max_rows_received=int(stats.rows_received.max()), peak_rows=int(stats.peak_rows.max()),
                         overflow_rows=int(stats.overflow_rows.sum()), dropped_rows=int(stats.dropped_rows.sum()),
                         rows_total=int(stats.rows_received.sum()), buffer_rows=int(stats.buffer_rows.max()),
                         balanced_rows=sizes.balanced_rows, worst_case_rows=sizes.worst_case_rows))
    return rows


def run(args) -> dict:
    """For each EP size the exchange of sharding.expert_parallel runs once (forward) per routing scenario
    (`measure_buffers`: uniform; skew90, 90 % of choices to expert 0; hot_rank, every choice on rank 0's experts) on
    an `expert` mesh. Reported per scenario: exchange rounds, the fullest round's filled rows (peak), the most rows
    one rank computed over all rounds (what a single-shot dropless buffer would need for this routing), the bounded
    per-round receive buffer of token rows (one per destination rank; the exchange's stats), and the single-shot
    worst case EP·T·min(K, E/EP) (sharding.ep_buffers). Every size is also given as a ratio to the balanced size
    T·K."""
    from sharding.ep_buffers import ep_buffer_size
    from sharding.mesh import build_mesh

    devices = require_devices(max(args.ep))
    mib = 2.0 ** 20
    rows = []
    for ep in args.ep:
        mesh = build_mesh({"expert": ep}, devices[:ep])
        sizes = ep_buffer_size(args.tokens_per_rank, args.top_k, args.experts, ep,
                               capacity_factor=args.capacity_factor, block_multiple=args.block_multiple,
                               d_model=args.d_model, dtype="bfloat16")
        measured = measure_buffers(mesh, tokens_per_rank=args.tokens_per_rank, top_k=args.top_k,
                                   n_experts=args.experts, capacity_factor=args.capacity_factor,
                                   block_multiple=args.block_multiple, kinds=tuple(args.routing))
        for m in measured:
            balanced = m["balanced_rows"]
            rows.append(dict(ep=ep, tokens_per_rank=args.tokens_per_rank, top_k=args.top_k, experts=args.experts,
                             capacity_per_peer=sizes.capacity_per_peer, **m,
                             peak_vs_balanced=m["peak_rows"] / balanced,
                             received_vs_balanced=m["max_rows_received"] / balanced,
                             buffer_vs_balanced=m["buffer_rows"] / balanced,
                             worst_case_vs_balanced=m["worst_case_rows"] / balanced,
                             buffer_mib=m["buffer_rows"] * sizes.row_bytes / mib,
                             balanced_mib=sizes.balanced_bytes / mib,
                             worst_case_mib=sizes.worst_case_bytes / mib))
    config = dict(ep=list(args.ep), tokens_per_rank=args.tokens_per_rank, top_k=args.top_k, experts=args.experts,
                  capacity_factor=args.capacity_factor, block_multiple=args.block_multiple,
                  d_model_for_bytes=args.d_model, bytes_dtype="bfloat16", impl="all_to_all")
    return {"config": config, "baseline": BASELINE, "rows": rows}


COLUMNS = [("EP", "ep", "d"), ("routing", "routing", "s"), ("rounds", "rounds", "d"),
           ("peak rows", "peak_rows", "d"), ("max received", "max_rows_received", "d"),
           ("buffer rows", "buffer_rows", "d"), ("balanced", "balanced_rows", "d"),
           ("worst case", "worst_case_rows", "d"), ("peak/bal", "peak_vs_balanced", ".2f"),
           ("received/bal", "received_vs_balanced", ".2f"), ("buffer/bal", "buffer_vs_balanced", ".2f"),
           ("worst/bal", "worst_case_vs_balanced", ".2f"), ("dropped", "dropped_rows", "d"),
           ("buffer MiB", "buffer_mib", ".1f"), ("worst MiB", "worst_case_mib", ".1f")]


def table(result: dict) -> str:
    c = result["config"]
    head = (f"{c['tokens_per_rank']} tokens/rank, top-{c['top_k']} of {c['experts']} experts, capacity_factor="
            f"{c['capacity_factor']:g}; rows per rank (max over ranks); MiB at D={c['d_model_for_bytes']} bf16; "
            f"baseline: {result['baseline']}")
    return head + "\n" + format_table(result["rows"], COLUMNS)
