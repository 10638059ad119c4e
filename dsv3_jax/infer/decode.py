"""Inference over MLA's latent cache, through the model's own modules (DeepSeekV3.decode / .draft): prefill (the
training-form attention writing the prompt's latents), absorbed-MLA decode steps, batched generation.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import kernels as kernel_registry
from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.cache import DecodeCache, init_cache
from dsv3_jax.infer.sampling import sample_tokens
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.model.layers.mla import LatentCache, LayerCache


def serving_config(config: ModelConfig) -> ModelConfig:
    """Decoding computes in `dtype` from the stored weights: an FP8-trained model (model.fp8) is served from its
    master weights, an FP8-imported one through its FP8 kernels and scales (dsv3_jax.model.fp8_weights)."""
    return config.replace(fp8=False) if config.fp8 else config


def serving_kernels(config: ModelConfig, device=None) -> KernelSet:
    """The kernels decoding runs on `device` (default: the first device), resolved once per generation."""
    return kernel_registry.resolve(serving_config(config), [device or jax.devices()[0]])


def forward_with_cache(config: ModelConfig, variables: dict, tokens_BT, positions_BT, cache: DecodeCache,
                       absorbed: bool = True, kernels: KernelSet | None = None):
    """Main model on the new tokens at `positions_BT`: (logits_BTV float32, hidden_BTD before the final norm,
    cache with their latents written). absorbed=False is the training-form attention (used for prefill).
    `kernels`: default the first device's."""
    model = DeepSeekV3(serving_config(config), kernels, absorbed)
    logits_BTV, hidden_BTD, dense, moe = model.apply(variables, tokens_BT, positions_BT, cache.dense, cache.moe,
                                                     method="decode")
    return logits_BTV, hidden_BTD, cache._replace(dense=dense, moe=moe)


def mtp_with_cache(config: ModelConfig, variables: dict, hidden_BTD, next_tokens_BT, positions_BT,
                   cache: DecodeCache, absorbed: bool = True, kernels: KernelSet | None = None):
    """MTP module 0 at `positions_BT`: from a hidden state at position i (the main model's, or the module's own
    when drafting further ahead) and the token at i+1, the logits for the token at i+2; (logits_BTV, the module's
    hidden output_BTD before its head norm, cache with the module's latents written)."""
    model = DeepSeekV3(serving_config(config), kernels, absorbed)
    layer = LayerCache(cache.mtp.latent_LBSW[0], cache.mtp.rope_LBSR[0])
    logits_BTV, h_BTD, layer = model.apply(variables, hidden_BTD, next_tokens_BT, positions_BT, layer,
                                           method="draft")
    return logits_BTV, h_BTD, cache._replace(mtp=LatentCache(layer.latent_BSW[None], layer.rope_BSR[None]))


# ---- generation -----------------------------------------------------------------------------------------

class Generation(NamedTuple):
    tokens: list            # per row, the generated ids (a stop token that ended the row included)
    decode_steps: int       # main-model forward steps after the prefill
    drafted: int = 0        # speculative decoding: drafts proposed to rows still generating
    accepted: int = 0       # ... and of those, drafts the main model confirmed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def pad_prompts(prompts) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (B, T) int32 tokens (pad id 0) and the (B,) prompt lengths; every prompt non-empty."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError("generate needs at least one prompt, each of at least one token")
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = np.asarray(prompt, np.int32)
    return tokens, lengths


def check_cache_len(cache_len: int | None, needed: int) -> int:
    if cache_len is not None and cache_len < needed:
        raise ValueError(f"cache_len={cache_len} is too short: this generation needs {needed} slots per row")
    return needed if cache_len is None else cache_len


class Emitter:
    """Host-side bookkeeping: appends each row's tokens until a stop token or max_new_tokens, streams them."""

    def __init__(self, batch: int, max_new_tokens: int, stop_tokens, on_token: Callable[[int, int], None] | None):
        self.tokens = [[] for _ in range(batch)]
        self.done = np.zeros(batch, bool) if max_new_tokens > 0 else np.ones(batch, bool)
        self.max_new, self.stop, self.on_token = max_new_tokens, frozenset(int(t) for t in stop_tokens), on_token

    def emit(self, row: int, token: int) -> None:
        if self.done[row]:
            return
        self.tokens[row].append(token)
        if self.on_token is not None:
            self.on_token(row, token)
        if token in self.stop or len(self.tokens[row]) >= self.max_new:
            self.done[row] = True

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())


@partial(jax.jit, static_argnames=("config", "kernels"), donate_argnames=("cache",))
def prefill(config: ModelConfig, variables: dict, tokens_BT, lengths_B, cache: DecodeCache,
            kernels: KernelSet | None = None):
    """The prompts through the training-form attention, filling the cache: (last-prompt-token logits_BV,
    hidden_BTD, cache). Rows are right-padded; padding's cache slots get overwritten by generated tokens."""
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTV, hidden_BTD, cache = forward_with_cache(config, variables, tokens_BT, positions_BT, cache,
                                                       absorbed=False, kernels=kernels)
    return logits_BTV[jnp.arange(B), lengths_B - 1], hidden_BTD, cache


@partial(jax.jit, static_argnames=("config", "absorbed", "kernels"), donate_argnames=("cache",))
def decode_step(config: ModelConfig, variables: dict, tokens_B, positions_B, cache: DecodeCache,
                absorbed: bool = True, kernels: KernelSet | None = None):
    """One new token per row at its own position, absorbed MLA: (logits_BV, cache)."""
    logits_B1V, _, cache = forward_with_cache(config, variables, tokens_B[:, None], positions_B[:, None], cache,
                                              absorbed=absorbed, kernels=kernels)
    return logits_B1V[:, 0], cache


_sample = jax.jit(sample_tokens, static_argnames=("temperature", "top_p"))


def generate(config: ModelConfig, variables: dict, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_tokens=(), on_token=None,
             cache_len: int | None = None) -> Generation:
    """Batched generation from token-id prompts of any lengths (right-padded internally); each row stops at
    its first stop token or after max_new_tokens. `on_token(row, id)` streams tokens as they are chosen.
    `cache_len` (slots per row, default longest prompt + max_new_tokens) fixes the compiled shapes.

        result = generate(config, variables, [[1, 2, 3], [4, 5]], max_new_tokens=16, stop_tokens=[eos_id])
    """
    tokens_BT, lengths_B = pad_prompts(prompts)
    B, T = tokens_BT.shape
    emitter = Emitter(B, max_new_tokens, stop_tokens, on_token)
    cache = init_cache(config, B, check_cache_len(cache_len, T + max_new_tokens))
    rng = jax.random.PRNGKey(seed)
    kernels = serving_kernels(config)
    logits_BV, _, cache = prefill(config, variables, jnp.asarray(tokens_BT), jnp.asarray(lengths_B), cache,
                                  kernels=kernels)
    positions_B = jnp.asarray(lengths_B)
    steps = 0
    while True:
        rng, key = jax.random.split(rng)
        next_B = _sample(logits_BV, key, temperature=float(temperature), top_p=float(top_p))
        for row, token in enumerate(np.asarray(next_B).tolist()):
            emitter.emit(row, token)
        if emitter.all_done:
            return Generation(emitter.tokens, steps)
        logits_BV, cache = decode_step(config, variables, next_B, positions_B, cache, kernels=kernels)
        positions_B = positions_B + 1
        steps += 1
