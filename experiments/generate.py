"""Generate text from a trained model (`--ckpt WORKDIR` or `--hf-dir DIR`) over the absorbed-MLA latent cache, printing
tokens as they are chosen and tokens/s at the end. `--speculative mtp` lets the MTP module draft tokens that the main
model verifies in one step: greedy's tokens at temperature 0, the same distribution as plain sampling otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from dsv3_jax.model import fp8_weights
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.data import DataConfig, DataError, Tokenizer
from dsv3_jax.data import load_tokenizer as load_data_tokenizer
from dsv3_jax.infer import generate, generate_speculative
from jax_compat.platforms import PlatformError, choose_platforms

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input (exit code 2, one line)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="DIR", help="a pre-training workdir (or its checkpoints/ folder): the "
                        "newest orbax checkpoint's params; needs --tokenizer (checkpoints do not record it: for "
                        "the BPE trained by pretrain, pass its tokenizer.json from ~/.cache/dsv3_jax)")
    source.add_argument("--hf-dir", metavar="DIR", help="a Hugging Face DeepSeek-V2/V3 checkpoint directory "
                        "(its tokenizer.json is used unless --tokenizer is given)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with the tokenizer")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids (no tokenizer needed; ids are printed)")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", choices=["mtp"], default=None, help="MTP drafts, the main model verifies")
    p.add_argument("--draft-tokens", type=int, default=1, metavar="N", help="MTP drafts per step with "
                   "--speculative mtp (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="an HF tokenizer.json")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    return p


def load_train_checkpoint(path: str, dtype: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig from the checkpoint's metadata, {'params', 'moe_bias'}) of the newest step under `path`;
    the optimizer state is not read. FP8 weights kept by `experiments.convert --fp8` come with their scales, and
    generation runs them as FP8 matmuls with those block scales."""
    import numpy as np

    from dsv3_jax.io import convert

    try:
        opened = convert.open_checkpoint(path)
    except convert.ConvertError as e:
        raise UsageError(f"--ckpt: {e}") from None
    read = lambda tree: jax.tree.map(np.asarray, tree)
    variables = read(opened.variables)
    params = fp8_weights.with_scales(variables["params"], read(opened.scales))
    return opened.config.replace(dtype=dtype).validate(), {"params": params, "moe_bias": variables.get("moe_bias", {})}


def load_model(args) -> tuple[ModelConfig, dict]:
    if args.ckpt is not None:
        return load_train_checkpoint(args.ckpt, args.dtype)
    from dsv3_jax.io.hf import load_pretrained

    return load_pretrained(args.hf_dir, dtype=args.dtype)


def load_tokenizer(args) -> Tokenizer | None:
    path = args.tokenizer
    if path is None and args.hf_dir is not None and os.path.isfile(os.path.join(args.hf_dir, "tokenizer.json")):
        path = os.path.join(args.hf_dir, "tokenizer.json")
    if path is None:
        if args.prompt is not None:
            raise UsageError("--prompt needs a tokenizer: pass --tokenizer tokenizer.json (or use --prompt-ids)")
        return None
    return load_data_tokenizer(DataConfig(tokenizer=path))


class Streamer:
    """Prints row 0's text as it grows (decoding the whole sequence, so multi-token characters come out whole)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""
        self.times = []   # when each of row 0's tokens arrived

    def __call__(self, row: int, token: int) -> None:
        if row != 0:
            return
        self.ids.append(token)
        self.times.append(time.perf_counter())
        if self.tokenizer is None:
            print(f" {token}", end="", flush=True)
            return
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):   # an incomplete UTF-8 sequence: wait for the rest
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.draft_tokens < 1:
        raise UsageError(f"--draft-tokens must be at least 1, got {args.draft_tokens}")
    if args.temperature < 0 or not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    tokenizer = load_tokenizer(args)
    if args.prompt is not None:
        prompt = tokenizer.encode(args.prompt).tolist()
    else:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids {args.prompt_ids!r}: not comma-separated integers") from None
    if not prompt:
        raise UsageError("the prompt encodes to no tokens")
    config, variables = load_model(args)
    if max(prompt) >= config.vocab_size:
        raise UsageError(f"prompt token id {max(prompt)} >= model vocab_size={config.vocab_size}")
    variables = jax.device_put(variables)
    stop = [tokenizer.eos_id] if tokenizer is not None else []
    print(args.prompt if args.prompt is not None else " ".join(map(str, prompt)), end="", flush=True)
    streamer = Streamer(tokenizer)
    start = time.perf_counter()
    if args.speculative == "mtp":
        result = generate_speculative(config, variables, [prompt], args.max_new_tokens, n_draft=args.draft_tokens,
                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                      stop_tokens=stop, on_token=streamer)
    else:
        result = generate(config, variables, [prompt], args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, stop_tokens=stop, on_token=streamer)
    end = time.perf_counter()
    n = len(result.tokens[0])
    times = streamer.times
    line = f"\n[{n} tokens, {n / (end - start):.1f} tokens/s overall; first token after {times[0] - start:.2f} s"
    if len(times) > 2 and times[-1] > times[1]:   # from the second token on: the decode step is compiled
        line += f"; decode {(len(times) - 2) / (times[-1] - times[1]):.1f} tokens/s"
    if args.speculative == "mtp":
        line += (f"; MTP acceptance {result.acceptance_rate:.1%} ({result.accepted}/{result.drafted} drafts, "
                 f"{args.draft_tokens} per step), {(n - 1) / max(result.decode_steps, 1):.2f} tokens per "
                 f"main-model step")
    print(line + "]", flush=True)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        note = choose_platforms()   # the accelerators this machine has; a broken plugin in one line
        if note:
            print(note, file=sys.stderr)
        return run(args)
    except (UsageError, ConfigError, DataError, ValueError, PlatformError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
