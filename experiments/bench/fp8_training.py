"""FP8 vs BF16 training: the same model, initialisation and token stream, trained with and without `model.fp8`; the
relative difference of the cross-entropy at the end (the recipe's accuracy budget). Baseline: the BF16 run.
"""

from __future__ import annotations

import dataclasses

import time

from experiments.bench import format_table

NAME = "fp8_training"
SUMMARY = "tiny preset, FP8 vs BF16 compute, same seed and data: loss difference at the end"
BASELINE = "bf16 (model.fp8=false)"
DEVICES = 0
USES_JAX = True            # on the default device(s), whatever they are
SUCCESSOR_PROBS = (0.5, 0.25, 0.15, 0.1)


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="updates per run (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row (default: %(default)s)")
    parser.add_argument("--states", type=int, default=512, help="Markov-chain vocabulary (default: %(default)s)")
    parser.add_argument("--tail", type=int, default=20, help="steps averaged at the end (default: %(default)s)")


def markov_stream(states: int, steps: int, batch: int, seq_len: int, seed: int = 0):
    """A fixed random Markov chain (each token has 4 successors with probabilities 0.5/0.25/0.15/0.1), so the loss
    keeps falling towards a known floor (its entropy) and both runs see identical batches."""
    import numpy as np

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, states, (states, len(SUCCESSOR_PROBS)))
    probs = np.asarray(SUCCESSOR_PROBS)
    batches = []
    for _ in range(steps):
        tokens = np.empty((batch, seq_len), np.int32)
        tokens[:, 0] = rng.integers(0, states, batch)
        for t in range(1, seq_len):
            tokens[:, t] = successors[tokens[:, t - 1], rng.choice(len(probs), batch, p=probs)]
        batches.append(tokens)
    return batches, float(-(probs * np.log(probs)).sum())


def train(config, batches) -> tuple[list[float], float, int]:
    """CE per step, wall seconds after the first (compiling) step, skipped updates."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsv3_jax.train.build import build_step
    from dsv3_jax.train.run_config import compile_run
    from dsv3_jax.train.schedule import ScheduleConfig
    from dsv3_jax.train.step import BalanceConfig
    from sharding import build_mesh

    steps, rows, length = len(batches), *batches[0].shape
    run = compile_run(config, batch=rows, seq_len=length, strategy="replicated")
    run = dataclasses.replace(run, schedule=ScheduleConfig(peak_lr=3e-3, warmup=20, decay=max(steps - 20, 1),
                                                           decay_to=3e-4), balance=BalanceConfig(gamma=0.001))
    built = build_step(run, build_mesh({"data": 1}, jax.devices()[:1]))
    step, state = built.jitted, built.init_state()
    losses, skipped, start = [], 0, None
    for i, tokens in enumerate(batches):
        state, metrics = step(state, {"tokens": jnp.asarray(tokens[None])}, jnp.float32(i * rows * length),
                              jnp.float32(np.inf))
        losses.append(float(metrics["ce"]))
        skipped += int(metrics["skipped"])
        start = start or time.time()
    return losses, time.time() - start, skipped


def run(args) -> dict:
    import numpy as np

    from dsv3_jax import get_preset

    batches, floor = markov_stream(args.states, args.steps, args.batch, args.seq_len)
    rows = []
    for fp8 in (False, True):
        config = get_preset(args.preset).replace(dtype="bfloat16", fp8=fp8, vocab_size=max(args.states, 2))
        losses, wall, skipped = train(config, batches)
        rows.append(dict(run="fp8" if fp8 else "bf16", first=losses[0], final=losses[-1],
                         tail_mean=float(np.mean(losses[-args.tail:])), skipped=skipped, wall_s=wall,
                         losses=losses))
    base, fp8 = (np.asarray(r["losses"]) for r in rows)
    for row in rows:
        ours = np.asarray(row["losses"])
        row.update(final_rel_diff=abs(ours[-1] - base[-1]) / base[-1],
                   tail_rel_diff=abs(ours[-args.tail:].mean() - base[-args.tail:].mean()) / base[-args.tail:].mean(),
                   max_rel_diff=float(np.max(np.abs(ours - base) / base)))
    config = dict(preset=args.preset, steps=args.steps, batch=args.batch, seq_len=args.seq_len, states=args.states,
                  tail=args.tail, entropy_floor=floor)
    return {"config": config, "baseline": BASELINE, "rows": rows}


COLUMNS = [("run", "run", "s"), ("first CE", "first", ".4f"), ("final CE", "final", ".4f"),
           ("tail mean CE", "tail_mean", ".4f"), ("final rel diff", "final_rel_diff", ".3%"),
           ("tail rel diff", "tail_rel_diff", ".3%"), ("max rel diff", "max_rel_diff", ".3%"),
           ("skipped", "skipped", "d"), ("wall s", "wall_s", ".1f")]


def table(result: dict) -> str:
    c = result["config"]
    head = (f"{c['preset']} (bf16 compute), {c['steps']} steps of {c['batch']}×{c['seq_len']} tokens from a "
            f"{c['states']}-state Markov chain (entropy floor {c['entropy_floor']:.4f}); tail = last {c['tail']} "
            f"steps; baseline: {result['baseline']}")
    return head + "\n" + format_table(result["rows"], COLUMNS)
