"""Pre-train DeepSeek-V3: `python -m experiments.pretrain --config tiny --workdir DIR [--steps N] [--data PATH_OR_GLOB]
[--tokenizer tokenizer.json] [--set section.field=value ...]`. Re-running it resumes from DIR's newest checkpoint;
with no --data it trains on the Python standard library's sources and documentation, with a BPE trained on them.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import dsv3_jax.data
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.data import DataError, load_tokenizer
from dsv3_jax.io.checkpoint import FRESH_DATA_KEY, Checkpointer, CheckpointMismatch, model_signature
from dsv3_jax.model.counting import count_params, train_flops_per_token
from dsv3_jax.train.build import build_step
from dsv3_jax.train.metrics_log import MetricsLog
from dsv3_jax.train.mfu import mfu, peak_flops_per_device
from dsv3_jax.train.run_config import RunConfig, mesh_axes, micro_batches_at, validate_run
from experiments.init_from import InitSource
from jax_compat.platforms import PlatformError, choose_platforms
from experiments.presets import RUN_PRESETS, describe_fields, get_run_preset
from sharding.distributed import DistributedError
from sharding.distributed import initialize as initialize_distributed
from sharding.mesh import build_mesh, put_batch

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3   # the non-finite/spike policy "stop" fired


def build_parser() -> argparse.ArgumentParser:
    epilog = ["presets: " + ", ".join(RUN_PRESETS), "", "fields (--set section.field=value), tiny's defaults:"]
    epilog += describe_fields(RUN_PRESETS["tiny"])
    p = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__,
                                epilog="\n".join(epilog), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="run preset (see below)")
    p.add_argument("--workdir", default=None, help="checkpoints and logs (default: runs/<config>)")
    p.add_argument("--steps", type=int, default=None, help="total updates (train.steps)")
    p.add_argument("--data", default=None, help="file, directory or glob of .txt/.jsonl/.parquet/.arrayrecord")
    p.add_argument("--tokenizer", default=None, help="an HF tokenizer.json (default: BPE trained on the data)")
    p.add_argument("--hf-config", default=None, metavar="PATH",
                   help="take the model from an HF config.json (or a directory holding one); --set model.* after it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides")
    multi = p.add_argument_group("multi-process (also read from SLURM, TPU VM and JAX_COORDINATOR_ADDRESS "
                                 "environments)")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    return p


def resolve_config(args) -> RunConfig:
    cfg = get_run_preset(args.config)
    if args.hf_config is not None:   # the model of an HF checkpoint (e.g. one converted by experiments.convert)
        model = ModelConfig.from_hf(args.hf_config, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
        cfg = RunConfig(**{**cfg.__dict__, "model": model})
    cfg = cfg.with_overrides(*args.overrides)
    changes = {}
    if args.steps is not None:
        changes["train"] = cfg.train.__class__(**{**cfg.train.__dict__, "steps": args.steps})
    if args.data is not None or args.tokenizer is not None:
        data = cfg.data.__dict__ | {k: v for k, v in (("path", args.data), ("tokenizer", args.tokenizer)) if v}
        changes["data"] = cfg.data.__class__(**data)
    cfg = RunConfig(**{**cfg.__dict__, **changes})
    validate_run(cfg)
    return cfg


def check_token_ids(batch: dict, vocab_size: int) -> None:
    top = int(batch["tokens"].max())
    if top >= vocab_size:
        raise DataError(f"token id {top} >= model.vocab_size={vocab_size}: the tokenizer and the model disagree")


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def prepare(args):
    """Everything that can reject bad input, before any compile: config, tokenizer, data, checkpoint."""
    cfg = resolve_config(args)
    workdir = args.workdir or os.path.join("runs", args.config)
    tokenizer = load_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                          f"{cfg.model.vocab_size}; set --set model.vocab_size={tokenizer.vocab_size}")
    data_iter = dsv3_jax.data.make_batch_iterator(cfg.data, tokenizer, jax.process_index(), jax.process_count())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep, cfg.checkpoint.every,
                        cfg.checkpoint.use_async)
    latest = ckpt.latest_step()
    meta = ckpt.check_compatible(latest, cfg.model) if latest is not None else None
    source = InitSource(cfg.checkpoint.init_from, cfg.model) if latest is None and cfg.checkpoint.init_from else None
    return cfg, workdir, tokenizer, data_iter, ckpt, latest, meta, source


def train(cfg: RunConfig, workdir: str, data_iter, ckpt: Checkpointer, latest, meta,
          source: InitSource | None = None) -> int:
    mesh = build_mesh(mesh_axes(cfg))
    built = build_step(cfg, mesh)   # kernels resolved for the mesh's chips, once (built.kernels)
    model = built.model
    log = MetricsLog(workdir, cfg.logging.tensorboard, enabled=jax.process_index() == 0)
    log.write_run_config(cfg, built.kernels, built.compiler_options)
    placed = built.placed_state()
    if latest is None:
        if source is None:
            state = built.init_state()
        else:   # another run's weights, optimizer state and routing biases; this run's step 0
            state = source.restore(placed)
            print(f"initialised from {source.where} (checkpoint.init_from)", flush=True)
        tokens_seen, loss_ema, meta = 0, None, {}
    else:
        state, data_state, meta = ckpt.restore(latest, placed)
        if not data_state.get(FRESH_DATA_KEY):   # a converted checkpoint starts the data stream at its beginning
            data_iter.set_state(data_state)
        tokens_seen, loss_ema = int(meta["tokens_seen"]), meta.get("loss_ema")
        log.truncate_after(latest)
        print(f"resumed from {ckpt.directory}/{latest} ({tokens_seen:,} tokens seen)", flush=True)
    start = int(jax.device_get(state.step))

    counts = count_params(model)
    flops_per_token = train_flops_per_token(model, cfg.data.seq_len)
    peak = peak_flops_per_device()
    print(f"model: {counts.total / 1e6:,.2f}M params ({counts.activated / 1e6:,.2f}M activated, "
          f"MTP {counts.mtp_unique / 1e6:,.2f}M); {jax.device_count()} × {jax.devices()[0].device_kind}; "
          f"workdir {workdir}", flush=True)
    k = built.kernels
    print(f"kernels ({k.target}): attention {k.attention}, FP8 matmul {k.fp8_matmul}, grouped matmul "
          f"{k.grouped_matmul}, dispatch {k.dispatch}" + (f", experts split over {k.experts.axis}" if k.experts else "")
          + "; run_config.json in the workdir", flush=True)

    jitted = built.jitted
    stop = StopRequest()
    from tqdm import tqdm
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not cfg.logging.progress or jax.process_index() != 0,
               dynamic_ncols=True, unit="step")
    last_log_time, last_log_tokens, first_logged_loss = time.time(), tokens_seen, None
    exit_code = 0
    step = start
    try:
        while step < cfg.train.steps:
            n_micro = micro_batches_at(cfg, tokens_seen)
            micro = [next(data_iter) for _ in range(n_micro)]
            for b in micro:
                check_token_ids(b, model.vocab_size)
            batch = put_batch(mesh, {k: np.stack([b[k] for b in micro]) for k in micro[0]}, batch_dim=1)
            limit = cfg.train.spike_factor * loss_ema if cfg.train.spike_factor > 0 and loss_ema else math.inf
            state, metrics = jitted(state, batch, jnp.float32(tokens_seen), jnp.float32(limit))
            step += 1
            tokens_seen += n_micro * cfg.data.batch_size * cfg.data.seq_len
            loss, skipped = (float(x) for x in jax.device_get((metrics["loss"], metrics["skipped"])))
            if skipped:
                reason = "non-finite loss or gradient" if not math.isfinite(loss) else f"loss spike ({loss:.4f})"
                log.event({"step": step, "event": "skipped_update", "reason": reason, "loss": loss})
                tqdm.write(f"step {step}: {reason}; update skipped")
                if cfg.train.on_nonfinite == "stop":
                    ckpt.save(step, state, data_iter.get_state(), _meta(model, tokens_seen, loss_ema), force=True)
                    ckpt.wait()
                    print(f"error: step {step}: {reason}; checkpoint saved, stopping (train.on_nonfinite=stop)",
                          file=sys.stderr)
                    exit_code = EXIT_STOPPED
                    break
            else:
                loss_ema = loss if loss_ema is None else cfg.train.spike_ema * loss_ema + (1 - cfg.train.spike_ema) * loss

            if step % cfg.logging.every == 0 or step == cfg.train.steps or step == start + 1:
                now = time.time()
                tok_s = (tokens_seen - last_log_tokens) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_tokens = now, tokens_seen
                record, load = _record(step, metrics, tokens_seen, tok_s, mfu(tok_s, flops_per_token,
                                                                                jax.device_count(), peak))
                first_logged_loss = first_logged_loss or record["loss"]
                log.write(record, load)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                                mfu="n/a" if record["mfu"] is None else f"{record['mfu']:.1%}")
            bar.update(1)
            ckpt.save(step, state, data_iter.get_state(), _meta(model, tokens_seen, loss_ema))
            if stop.signum is not None:
                ckpt.save(step, state, data_iter.get_state(), _meta(model, tokens_seen, loss_ema), force=True)
                ckpt.wait()
                tqdm.write(f"signal {stop.signum}: checkpoint saved at step {step}; re-run the command to resume")
                exit_code = 128 + stop.signum
                break
        else:
            if ckpt.latest_step() != step:
                ckpt.save(step, state, data_iter.get_state(), _meta(model, tokens_seen, loss_ema), force=True)
            if first_logged_loss is not None:
                print(f"\ndone: step {step}, loss {first_logged_loss:.4f} at the first logged step → "
                      f"{loss_ema if loss_ema is not None else float('nan'):.4f} (running mean) now", flush=True)
    finally:
        bar.close()
        ckpt.close()
        log.close()
    return exit_code


def _meta(model, tokens_seen: int, loss_ema) -> dict:
    return {"model": model_signature(model), "tokens_seen": tokens_seen, "loss_ema": loss_ema}


def _record(step, metrics, tokens_seen, tok_s, mfu_value):
    m = jax.device_get(metrics)
    record = {"step": step, "loss": float(m["loss"]), "ce": float(m["ce"]),
              "mtp_loss": float(m["mtp_ce"]) if "mtp_ce" in m else None,
              "balance_loss": float(m["balance"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
              "mtp_weight": float(m["mtp_weight"]), "tokens": tokens_seen, "tokens_per_s": tok_s, "mfu": mfu_value}
    load = None
    if "expert_counts_LE" in m:
        counts = np.asarray(m["expert_counts_LE"], np.float64)
        record["expert_load_violation"] = (counts.max(-1) / np.maximum(counts.mean(-1), 1e-9) - 1).tolist()
        load = counts.astype(int).tolist()
    return record, load


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        note = choose_platforms()   # the accelerators this machine has; a broken plugin in one line
        if note:
            print(note, file=sys.stderr)
        prepared = prepare(args)
    except (ConfigError, DataError, CheckpointMismatch, DistributedError, PlatformError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg, workdir, _, data_iter, ckpt, latest, meta, source = prepared
    try:
        return train(cfg, workdir, data_iter, ckpt, latest, meta, source)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
