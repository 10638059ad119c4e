"""Measured expert-parallel buffer use under uniform and skewed routing, next to the balanced and worst-case sizes.

    python -m sharding.ep_report --report [--ep 8 --tokens-per-rank 256 --top-k 8 --experts 64]

On a CPU-only host it simulates EP devices (XLA_FLAGS is set before JAX starts its backend).
"""

from __future__ import annotations

import argparse
import os

import numpy as np


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
                    kinds=("uniform", "skew90", "hot_rank"), expert_axis: str = "expert") -> list[dict]:
    """Runs the exchange (forward) once per routing scenario; one dict of row counts per scenario."""
    import jax
    import jax.numpy as jnp

    from sharding.ep_buffers import ep_buffer_size
    from sharding.expert_parallel import expert_parallel_ffn, token_shard_axes

    ep = mesh.shape[expert_axis]
    tokens = tokens_per_rank * int(np.prod([mesh.shape[a] for a in token_shard_axes(mesh, expert_axis)]))
    sizes = ep_buffer_size(tokens_per_rank, top_k, n_experts, ep, capacity_factor=capacity_factor,
                           block_multiple=block_multiple, d_model=d_model, dtype="float32")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(tokens, d_model)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32)
         for s in ((n_experts, d_model, d_ff), (n_experts, d_model, d_ff), (n_experts, d_ff, d_model))]
    weights = jnp.full((tokens, top_k), 1.0 / top_k, jnp.float32)
    run = jax.jit(lambda x, e, g, *w: expert_parallel_ffn(x, e, g, *w, mesh=mesh, impl=impl,
                                                          capacity_factor=capacity_factor,
                                                          block_multiple=block_multiple, expert_axis=expert_axis))
    rows = []
    for kind in kinds:
        experts = routing(kind, tokens, top_k, n_experts, ep)
        _, stats = run(x, jnp.asarray(experts), weights, *w)
        rows.append(dict(routing=kind, rounds=int(stats.rounds.max()),
                         max_rows_received=int(stats.rows_received.max()), peak_rows=int(stats.peak_rows.max()),
                         overflow_rows=int(stats.overflow_rows.sum()), dropped_rows=int(stats.dropped_rows.sum()),
                         rows_total=int(stats.rows_received.sum()), buffer_rows=sizes.buffer_rows,
                         balanced_rows=sizes.balanced_rows, worst_case_rows=sizes.worst_case_rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sharding.ep_report", description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="measure and print buffer rows per routing scenario")
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--tokens-per-rank", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--block-multiple", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=7168, help="row width for the byte sizes (bf16)")
    args = parser.parse_args(argv)
    if not args.report:
        parser.print_help()
        return
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.ep}").strip()
    import jax

    from sharding.ep_buffers import ep_buffer_size
    from sharding.mesh import build_mesh

    mesh = build_mesh({"expert": args.ep}, jax.devices()[:args.ep])
    rows = measure_buffers(mesh, tokens_per_rank=args.tokens_per_rank, top_k=args.top_k, n_experts=args.experts,
                           capacity_factor=args.capacity_factor, block_multiple=args.block_multiple)
    print(f"EP={args.ep}, {args.tokens_per_rank} tokens/rank, top-{args.top_k} of {args.experts} experts, "
          f"capacity_factor={args.capacity_factor} (rows per rank; peak = fullest round's filled rows)")
    print(format_rows(rows))
    b = ep_buffer_size(args.tokens_per_rank, args.top_k, args.experts, args.ep, capacity_factor=args.capacity_factor,
                       block_multiple=args.block_multiple, d_model=args.d_model, dtype="bfloat16")
    mib = 2.0 ** 20
    print(f"receive buffer at D={args.d_model} bf16: {b.buffer_bytes / mib:.1f} MiB per round "
          f"(balanced {b.balanced_bytes / mib:.1f} MiB, single-shot worst case {b.worst_case_bytes / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
