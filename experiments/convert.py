"""Convert between Hugging Face DeepSeek-V2/V3 checkpoints and pre-training checkpoints, one tensor at a time:
`--hf-dir DIR --out WORKDIR [--fp8]` imports (WORKDIR is what experiments.pretrain resumes), `--export --ckpt WORKDIR
--out-hf DIR [--step N]` exports. Bad input exits with code 2 and one line on stderr, leaving no output behind.
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="HF checkpoint directory to import")
    p.add_argument("--out", help="pre-training workdir to create (the checkpoint goes to OUT/checkpoints/0)")
    p.add_argument("--param-dtype", default="float32", help="dtype of the imported params (model.param_dtype)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of the run that will resume (its state rng)")
    p.add_argument("--fp8", action="store_true", help="keep FP8 (E4M3, 128x128-block) weights as FP8 with their "
                   "scales instead of dequantising them")
    p.add_argument("--export", action="store_true", help="export --ckpt to --out-hf instead")
    p.add_argument("--ckpt", help="pre-training workdir or its checkpoints/ directory to export")
    p.add_argument("--out-hf", help="HF checkpoint directory to write")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the latest)")
    return p


def resume_command(hf_dir: str, workdir: str, config) -> str:
    """The pretrain command whose model equals the converted one: the HF config plus what the conversion changed
    (MTP modules the checkpoint lacks; the parameter dtype)."""
    from dsv3_jax.config import ModelConfig
    read = ModelConfig.from_hf(hf_dir, param_dtype=config.param_dtype)
    flags = [f"--set model.{name}={getattr(config, name)}" for name in ("num_mtp_modules", "param_dtype")
             if getattr(read, name) != getattr(config, name) or name == "param_dtype"]
    return " ".join(["python -m experiments.pretrain --workdir", workdir, "--hf-config", hf_dir, *flags,
                     "[--data PATH] [--tokenizer tokenizer.json]"])


def main(argv=None) -> int:
    """The command line; the exit code.

        python -m experiments.convert --hf-dir DIR --out WORKDIR [--param-dtype float32] [--seed 0] [--fp8]
            HF safetensors (BF16, or FP8 + weight_scale_inv; MTP included) -> WORKDIR/checkpoints/0, which
            `python -m experiments.pretrain --workdir WORKDIR` resumes (with a model config equal to config.json's).
            --fp8 keeps an FP8 checkpoint's E4M3 weights as they are (1 byte each, plus their 128x128 block scales)
            instead of dequantising them: `experiments.generate --ckpt` then runs them as FP8 matmuls, while
            pre-training and --export dequantise them into master weights when they read the checkpoint.
        python -m experiments.convert --export --ckpt WORKDIR --out-hf DIR [--step N]
            a pre-training checkpoint's params and routing biases -> HF layout (config.json + safetensors).

    Tensors are read, converted and written one at a time (dsv3_jax.io.convert). Bad input (missing, mis-shaped or
    truncated tensors, an --out that already holds a checkpoint) exits with code 2 and one line on stderr, leaving no
    output behind."""
    parser = build_parser()
    args = parser.parse_args(argv)
    export = args.export or args.ckpt is not None or args.out_hf is not None
    if export and not (args.ckpt and args.out_hf):
        parser.error("export needs --ckpt and --out-hf")
    if export and args.fp8:
        parser.error("--fp8 applies to import (an export dequantises kept FP8 weights)")
    if not export and not (args.hf_dir and args.out):
        parser.error("import needs --hf-dir and --out (or --export --ckpt CKPT --out-hf DIR)")

    from dsv3_jax.config import ConfigError
    from dsv3_jax.io import convert
    from dsv3_jax.io.hf import CheckpointError
    from jax_compat.platforms import PlatformError, choose_platforms
    try:
        note = choose_platforms()   # the accelerators this machine has; a broken plugin in one line
        if note:
            print(note, file=sys.stderr)
        if export:
            config = convert.export_hf(args.ckpt, args.out_hf, args.step)
            print(f"wrote {args.out_hf} ({config.n_layers} layers, {config.num_mtp_modules} MTP module(s))")
        else:
            report = convert.import_hf(args.hf_dir, args.out, args.param_dtype, args.seed, keep_fp8=args.fp8)
            kept = f"; {report.fp8_leaves} weights kept as FP8" if args.fp8 else ""
            print(f"wrote {report.step_dir}: {report.n_leaves} arrays, {report.state_bytes / 2**20:,.1f} MiB "
                  f"(params {report.params_bytes / 2**20:,.1f} MiB, largest array "
                  f"{report.largest_leaf_bytes / 2**20:,.1f} MiB){kept}; continue training with\n"
                  f"  {resume_command(args.hf_dir, args.out, report.config)}")
    except (CheckpointError, convert.ConvertError, ConfigError, PlatformError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
