"""Pre-train a DeepSeek-V3 preset: `python -m experiments.pretrain --config tiny [--steps N] [--set model.f=v]`.

Until the data pipeline lands this trains on a fixed pool of random token sequences (so the loss
visibly falls as the model memorises them) with the full recipe: AdamW, schedule, MTP and balance
losses, and aux-loss-free bias updates.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ConfigError
from dsv3_jax.counting import count_params
from dsv3_jax.presets import PRESETS, get_preset
from dsv3_jax.train.loss import LossWeights
from dsv3_jax.train.optimizer import OptimizerConfig
from dsv3_jax.train.schedule import ScheduleConfig
from dsv3_jax.train.step import BalanceConfig, create_train_state, make_train_step


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = []
        for item in args.set:
            section, _, rest = item.partition(".")
            if section != "model" or not rest:
                raise ConfigError(f"--set {item}: only model.FIELD=VALUE is known to this job")
            overrides.append(rest)
        config = get_preset(args.config).with_overrides(*overrides).validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = count_params(config)
    print(f"{args.config}: {counts.total / 1e6:.2f}M params, {counts.activated / 1e6:.2f}M activated; "
          f"backend {jax.default_backend()}")

    schedule = ScheduleConfig(peak_lr=args.lr, warmup=max(args.steps // 20, 1), decay=args.steps,
                              decay_to=args.lr / 10)
    tx, step_fn = make_train_step(config, LossWeights(), schedule, OptimizerConfig(), BalanceConfig())
    state = create_train_state(config, tx, jax.random.PRNGKey(args.seed))
    step_fn = jax.jit(step_fn, donate_argnums=0)
    pool = np.random.default_rng(args.seed).integers(0, config.vocab_size, (4 * args.batch, args.seq_len))
    tokens_seen, start = 0, time.time()
    for step in range(args.steps):
        rows = pool[(step * args.batch + np.arange(args.batch)) % len(pool)]
        state, metrics = step_fn(state, {"tokens": jnp.asarray(rows, jnp.int32)}, jnp.float32(tokens_seen))
        tokens_seen += rows.size
        if step % 20 == 0 or step == args.steps - 1:
            m = jax.device_get(metrics)
            print(f"step {step:5d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  mtp {m.get('mtp_ce', 0):.4f}  "
                  f"lr {m['lr']:.2e}  {tokens_seen / (time.time() - start):,.0f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
