"""Decoding speed and cache size: our absorbed-MLA latent-cache decoder (dsv3_jax.infer) against Hugging Face
transformers' `generate` on the same weights, greedy, per batch size; plus MTP speculative decoding at batch 1.
Baseline: transformers `generate`.
"""

from __future__ import annotations

import time

from experiments.bench import format_table

NAME = "decode"
SUMMARY = "decode tokens/s and cache bytes/token, ours vs transformers generate; MTP speculation at batch 1"
BASELINE = "transformers DeepseekV3ForCausalLM.generate, same weights"
DEVICES = 0
USES_JAX = True


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="small", help="model preset (default: %(default)s)")
    parser.add_argument("--hf-dir", default=None, help="an HF checkpoint to use instead of random weights")
    parser.add_argument("--batch", type=_ints, default=[1, 8, 64], help="batch sizes (default: 1,8,64)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default: %(default)s)")
    parser.add_argument("--draft-tokens", type=_ints, default=[1, 2, 3],
                        help="MTP drafts per step for the speculative rows (default: 1,2,3)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute and weight dtype (default: bfloat16 on a GPU, float32 elsewhere)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, the median reported "
                        "(default: %(default)s)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")


class _Clock:
    """Time of the first token and the number of tokens, from generation's per-token callbacks."""

    def __init__(self):
        self.start, self.first, self.count = time.perf_counter(), None, 0

    def __call__(self, row: int, token: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.count += 1


def _timed(run, batch: int) -> dict:
    """Run `run(on_token)` and return its tokens, decode tokens/s after each row's first token, and prefill time."""
    clock = _Clock()
    result = run(clock)
    end = time.perf_counter()
    decoded = clock.count - batch
    return {"result": result, "decode_tok_s": decoded / max(end - clock.first, 1e-9),
            "prefill_s": clock.first - clock.start}


def _median(runs: list[dict]) -> dict:
    """The first run's other entries with the median decode tokens/s and prefill time of all runs."""
    import statistics

    return {**runs[0], "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "prefill_s": statistics.median(r["prefill_s"] for r in runs)}


def all_accepting(config, variables):
    """Weights under which MTP's drafts are always right: every block adds nothing (output projections zero), norm
    scales are one and MTP's projection keeps only the embedding, so the next token is a function of the current
    one that MTP computes one step ahead. The compute is that of the original weights."""
    import jax
    import jax.numpy as jnp

    D = config.dim

    def edit(path, leaf):
        name = jax.tree_util.keystr(path)
        if any(k in name for k in ("['wo']", "['down']", "['experts_down']")):
            return jnp.zeros_like(leaf)
        if "['scale']" in name:
            return jnp.ones_like(leaf)
        if "['eh_proj']" in name:
            return jnp.concatenate([jnp.eye(D, dtype=leaf.dtype), jnp.zeros((D, D), leaf.dtype)])
        return leaf

    return jax.tree_util.tree_map_with_path(edit, variables)


def random_weights(config, seed: int = 0) -> dict:
    """Variables shaped like the model's, drawn as its initialiser does (normal(initializer_range) weights, unit
    norm scales, zero routing biases), in numpy: no initialisation to compile."""
    import jax
    import numpy as np

    from dsv3_jax.model import init_variables

    abstract = jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        name = jax.tree_util.keystr(path)
        if "['scale']" in name:
            return np.ones(spec.shape, spec.dtype)
        if "moe_bias" in name:
            return np.zeros(spec.shape, spec.dtype)
        return (config.initializer_range * rng.standard_normal(spec.shape, np.float32)).astype(spec.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _ours_cache_bytes_per_token(config, batch: int, cache_len: int) -> float:
    import jax

    from dsv3_jax.infer import init_cache

    cache = init_cache(config, batch, cache_len)
    return sum(x.nbytes for x in jax.tree.leaves(cache)) / (batch * cache_len)


def _hf_model(config, variables, dtype: str, directory: str):
    import torch
    import transformers

    from dsv3_jax.io.hf import save_pretrained

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    save_pretrained(config, variables, directory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
    return model, device


def _hf_generate(model, device: str, prompts, new_tokens: int) -> dict:
    """transformers greedy `generate`, timed like ours (a streamer gets each step's tokens)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    batch = len(prompts)

    class Clock(BaseStreamer):
        def __init__(self):
            self.start, self.first, self.calls = time.perf_counter(), None, 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2:   # the first put is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    clock = Clock()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock,
                             return_dict_in_generate=True)
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    cache = out.past_key_values
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    length = cache.get_seq_length()
    return {"tokens": out.sequences[:, ids.shape[1]:].cpu().tolist(),
            "decode_tok_s": batch * (new_tokens - 1) / max(end - clock.first, 1e-9),
            "prefill_s": clock.first - clock.start, "cache_bytes_per_token": cache_bytes / (batch * length)}


def run(args) -> dict:
    """Weights: random, drawn like the preset's initialisation (seed 0), or `--hf-dir` (a real checkpoint). They are
    written with our `save_pretrained` and read by `DeepseekV3ForCausalLM.from_pretrained` (sdpa attention;
    transformers 5 caches the MLA latent as well, and expands per-head keys and values from all of it every step),
    on CUDA when torch has it, else on the CPU. Every row is timed after a warm-up run (compilation excluded), the
    median of `--repeats` runs: decode tokens/s counts the tokens after each row's first one over the time from the
    first token to the end; prefill is the time to the first token. Cache bytes per token are measured on the
    caches themselves (ours: the latent cache's arrays; HF: the tensors of the returned past_key_values), over every
    layer, per token of one row.

    Speculative rows (batch 1): `--draft-tokens` MTP drafts per main-model step, chained over the module's own
    hidden states, with the given weights (random weights draft almost nothing right) and with the weights changed
    so that every draft is right (`all_accepting`: the same compute, acceptance 1, the mechanism's upper bound).
    Speed-up is against our plain decoding at batch 1."""
    import tempfile

    import jax
    import numpy as np

    from dsv3_jax.infer import generate, generate_speculative
    from dsv3_jax.config.presets import get_preset

    dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    if args.hf_dir:
        from dsv3_jax.io.hf import load_pretrained
        config, variables = load_pretrained(args.hf_dir, dtype=dtype, param_dtype=dtype)
    else:
        config = get_preset(args.config).replace(dtype=dtype, param_dtype=dtype)
        variables = random_weights(config)
    variables = jax.device_put(variables)
    P, new = args.prompt_len, args.new_tokens
    if P < 1 or new < 2 or args.repeats < 1:
        raise SystemExit("--prompt-len and --repeats must be >= 1, --new-tokens >= 2")
    rng = np.random.default_rng(0)
    cache_len = P + new + max(args.draft_tokens, default=0) + 1
    hf = None
    if not args.no_hf:
        with tempfile.TemporaryDirectory(prefix="bench_decode_") as directory:
            hf = _hf_model(config, variables, dtype, directory)

    rows, plain_at_1 = [], None
    for batch in args.batch:
        prompts = rng.integers(0, config.vocab_size, (batch, P)).tolist()
        ours = lambda n, on_token=None: generate(config, variables, prompts, n, cache_len=cache_len, on_token=on_token)
        ours(2)   # compiles the prefill and decode step for these shapes
        timed = _median([_timed(lambda clock: ours(new, clock), batch) for _ in range(args.repeats)])
        row = {"impl": "ours", "batch": batch, "prompt": P, "new": new, "decode_tok_s": timed["decode_tok_s"],
               "prefill_s": timed["prefill_s"],
               "cache_bytes_per_token": _ours_cache_bytes_per_token(config, batch, cache_len)}
        rows.append(row)
        if batch == 1:
            plain_at_1 = (row, prompts, timed["result"].tokens)
        if hf is not None:
            _hf_generate(hf[0], hf[1], prompts, new)   # warm-up over every cache length it will see
            base = _median([_hf_generate(hf[0], hf[1], prompts, new) for _ in range(args.repeats)])
            same = np.mean([a == b for a, b in zip(timed["result"].tokens, base["tokens"])])
            rows.append({"impl": f"transformers ({hf[1]})", "batch": batch, "prompt": P, "new": new,
                         "decode_tok_s": base["decode_tok_s"], "prefill_s": base["prefill_s"],
                         "cache_bytes_per_token": base["cache_bytes_per_token"]})
            row.update(speedup=row["decode_tok_s"] / base["decode_tok_s"],
                       cache_ratio=base["cache_bytes_per_token"] / row["cache_bytes_per_token"], same_tokens=same)

    if plain_at_1 is not None and config.num_mtp_modules > 0:
        plain, prompts, reference = plain_at_1
        accepting = all_accepting(config, variables)
        for n_draft in args.draft_tokens:
            for label, weights in (("", variables), (" (all accepted)", accepting)):
                spec = lambda n, on_token=None: generate_speculative(
                    config, weights, prompts, n, n_draft=n_draft, cache_len=cache_len, on_token=on_token)
                spec(2)
                timed = _median([_timed(lambda clock: spec(new, clock), 1) for _ in range(args.repeats)])
                result = timed["result"]
                row = {"impl": f"ours + MTP x{n_draft}{label}", "batch": 1, "prompt": P, "new": new,
                       "decode_tok_s": timed["decode_tok_s"], "prefill_s": timed["prefill_s"],
                       "acceptance": result.acceptance_rate,
                       "tokens_per_step": (len(result.tokens[0]) - 1) / max(result.decode_steps, 1),
                       "vs_plain": timed["decode_tok_s"] / plain["decode_tok_s"]}
                if not label:
                    row["same_tokens"] = float(result.tokens == reference)
                rows.append(row)
    return {"rows": rows, "baseline": BASELINE, "config": args.hf_dir or args.config, "dtype": dtype}


COLUMNS = [("impl", "impl", "s"), ("batch", "batch", "d"), ("prompt", "prompt", "d"), ("new", "new", "d"),
           ("decode tok/s", "decode_tok_s", ",.1f"), ("prefill s", "prefill_s", ".3f"),
           ("cache B/token", "cache_bytes_per_token", ",.0f"), ("vs HF tok/s", "speedup", ".2f"),
           ("HF cache / ours", "cache_ratio", ".1f"), ("same tokens", "same_tokens", ".2f"),
           ("MTP acceptance", "acceptance", ".3f"), ("tokens/step", "tokens_per_step", ".2f"),
           ("vs ours plain", "vs_plain", ".2f")]


def table(result: dict) -> str:
    head = f"config {result['config']}, {result['dtype']}; MTP rows: speed-up against ours at batch 1\n"
    return head + format_table(result["rows"], COLUMNS)
