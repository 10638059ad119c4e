"""Inference forward passes over a latent cache: prefill (training-form attention) and absorbed-MLA decode.

The model's parameters are read straight from its variables tree ({'params', 'moe_bias'}, layers stacked
on a leading axis) and run through the model's own modules: every layer is the model's DecoderBlock, whose MLA
attends over the layer's latent cache (`layers.mla.CacheStep`), plus Linear and RMSNorm for the embedding, head
and MTP input, in `config.dtype` (an FP8-trained model is served from its master weights; FP8 weights kept by an
FP8 import run as FP8 matmuls with their stored scales, see dsv3_jax.model.fp8_weights).

    forward_with_cache(config, variables, tokens_BT, positions_BT, cache, absorbed)
        1. embed the new tokens; per layer (a lax.scan over each stacked stack):
        2.   project q, RMSNorm(c_kv) and RoPE(k_rope) of the new tokens; write the latter two into the cache
        3.   attend over the cache, naive (keys/values expanded by W_kvb) or absorbed (attention in latent space)
        4.   MLP or MoE, residuals
        5. final norm, output head → float32 logits, plus the last hidden state (MTP's input)
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.model import fp8_weights
from dsv3_jax.model.block import DecoderBlock
from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.cache import DecodeCache, LatentCache, init_cache
from dsv3_jax.infer.sampling import sample_tokens
from dsv3_jax.model.layers.linear import make_linear
from dsv3_jax.model.layers.mla import CacheStep
from dsv3_jax.model.layers.norm import RMSNorm
from dsv3_jax.model.layers.rope import rope_tables
from dsv3_jax.model.moe.router import BIAS_COLLECTION


def _linear(c: ModelConfig, p: dict, x, out_dtype=None):
    """The model's Linear over the parameters `p` (an FP8 kernel kept with its scales runs as an FP8 matmul)."""
    return make_linear(c, p["kernel"].shape[-1], ("embed", "embed"), "linear", out_dtype).apply({"params": p}, x)


def _norm(c: ModelConfig, p: dict, x):
    return RMSNorm(c.rms_norm_eps, c.jnp_param_dtype).apply({"params": p}, x)


def serving_config(config: ModelConfig) -> ModelConfig:
    """Decoding computes in `dtype` from the stored weights: an FP8-trained model (model.fp8) is served from its
    master weights, an FP8-imported one through its FP8 kernels and scales (dsv3_jax.model.fp8_weights)."""
    return config.replace(fp8=False) if config.fp8 else config


# ---- blocks and the model -------------------------------------------------------------------------------

def block_with_cache(c: ModelConfig, use_moe: bool, p: dict, bias, x_BTD, positions_BT, cos_sin, layer_cache,
                     absorbed: bool):
    """The model's DecoderBlock on the new tokens over one layer's (latent, rope) cache: (x_BTD, layer_cache).
    `bias` is the block's moe_bias subtree (unused by a dense block)."""
    variables = {"params": p}
    if use_moe:   # routed experts kept as FP8 are dequantised here, one layer at a time
        variables = {"params": {**p, "moe": fp8_weights.dequantize_siblings(p["moe"], c.jnp_dtype)},
                     BIAS_COLLECTION: bias}
    x_BTD, _, cache = DecoderBlock(c, use_moe).apply(variables, x_BTD, cos_sin, None,
                                                     cache=CacheStep(*layer_cache, positions_BT, absorbed))
    return x_BTD, (cache.latent_BSW, cache.rope_BSR)


def _stack_with_cache(c, use_moe, params, bias, x_BTD, positions_BT, cos_sin, cache: LatentCache, absorbed):
    def body(x, layer):
        p, b, latent, rope = layer
        x, (latent, rope) = block_with_cache(c, use_moe, p, b, x, positions_BT, cos_sin, (latent, rope), absorbed)
        return x, (latent, rope)

    x_BTD, (latent, rope) = jax.lax.scan(body, x_BTD, (params, bias, cache.latent_LBSW, cache.rope_LBSR))
    return x_BTD, LatentCache(latent, rope)


def embed_tokens(c: ModelConfig, params: dict, tokens_BT):
    return jnp.take(params["embed"]["embedding"].astype(c.jnp_dtype), tokens_BT, axis=0)


def output_logits(c: ModelConfig, params: dict, normed_BTD):
    if c.tie_word_embeddings:
        embedding_VD = params["embed"]["embedding"].astype(c.jnp_dtype)
        return jnp.dot(normed_BTD.astype(c.jnp_dtype), embedding_VD.T).astype(jnp.float32)
    return _linear(c, params["lm_head"], normed_BTD, jnp.float32)


def forward_with_cache(config: ModelConfig, variables: dict, tokens_BT, positions_BT, cache: DecodeCache,
                       absorbed: bool = True):
    """Main model on the new tokens at `positions_BT`: (logits_BTV float32, hidden_BTD before the final norm,
    cache with their latents written). absorbed=False is the training-form attention (used for prefill)."""
    c, params = serving_config(config), variables["params"]
    bias = variables.get(BIAS_COLLECTION, {})
    cos_sin = rope_tables(positions_BT, c)
    x_BTD = embed_tokens(c, params, tokens_BT)
    dense, moe = cache.dense, cache.moe
    if c.first_k_dense_replace > 0:
        x_BTD, dense = _stack_with_cache(c, False, params["dense_layers"], {}, x_BTD, positions_BT, cos_sin, dense,
                                         absorbed)   # dense blocks have no moe_bias
    if c.n_moe_layers > 0:
        x_BTD, moe = _stack_with_cache(c, True, params["moe_layers"], bias["moe_layers"], x_BTD, positions_BT,
                                       cos_sin, moe, absorbed)
    logits_BTV = output_logits(c, params, _norm(c, params["final_norm"], x_BTD))
    return logits_BTV, x_BTD, cache._replace(dense=dense, moe=moe)


def mtp_with_cache(config: ModelConfig, variables: dict, hidden_BTD, next_tokens_BT, positions_BT,
                   cache: DecodeCache, absorbed: bool = True):
    """MTP module 0 at `positions_BT`: from a hidden state at position i (the main model's, or the module's own
    when drafting further ahead) and the token at i+1, the logits for the token at i+2; (logits_BTV, the module's
    hidden output_BTD before its head norm, cache with the module's latents written)."""
    c, params = serving_config(config), variables["params"]
    p, bias = params["mtp_0"], variables.get(BIAS_COLLECTION, {}).get("mtp_0", {})
    emb_BTD = embed_tokens(c, params, next_tokens_BT)
    joined = jnp.concatenate([_norm(c, p["enorm"], emb_BTD), _norm(c, p["hnorm"], hidden_BTD.astype(c.jnp_dtype))],
                             axis=-1)
    x_BTD = _linear(c, p["eh_proj"], joined)
    layer_cache = (cache.mtp.latent_LBSW[0], cache.mtp.rope_LBSR[0])
    h_BTD, (latent, rope) = block_with_cache(c, True, p["block"], bias.get("block"), x_BTD, positions_BT,
                                             rope_tables(positions_BT, c), layer_cache, absorbed)
    logits_BTV = output_logits(c, params, _norm(c, p["head_norm"], h_BTD))
    return logits_BTV, h_BTD, cache._replace(mtp=LatentCache(latent[None], rope[None]))


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


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def prefill(config: ModelConfig, variables: dict, tokens_BT, lengths_B, cache: DecodeCache):
    """The prompts through the training-form attention, filling the cache: (last-prompt-token logits_BV,
    hidden_BTD, cache). Rows are right-padded; padding's cache slots get overwritten by generated tokens."""
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTV, hidden_BTD, cache = forward_with_cache(config, variables, tokens_BT, positions_BT, cache,
                                                       absorbed=False)
    return logits_BTV[jnp.arange(B), lengths_B - 1], hidden_BTD, cache


@partial(jax.jit, static_argnames=("config", "absorbed"), donate_argnames=("cache",))
def decode_step(config: ModelConfig, variables: dict, tokens_B, positions_B, cache: DecodeCache,
                absorbed: bool = True):
    """One new token per row at its own position, absorbed MLA: (logits_BV, cache)."""
    logits_B1V, _, cache = forward_with_cache(config, variables, tokens_B[:, None], positions_B[:, None], cache,
                                              absorbed=absorbed)
    return logits_B1V[:, 0], cache


_sample = jax.jit(sample_tokens, static_argnames=("temperature", "top_p"))


def generate(config: ModelConfig, variables: dict, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_tokens=(), on_token=None,
             cache_len: int | None = None) -> Generation:
    """Batched generation from token-id prompts of any lengths (right-padded internally); each row stops at
    its first stop token or after max_new_tokens. `on_token(row, id)` streams tokens as they are chosen.
    `cache_len` (slots per row, default longest prompt + max_new_tokens) fixes the compiled shapes."""
    tokens_BT, lengths_B = pad_prompts(prompts)
    B, T = tokens_BT.shape
    emitter = Emitter(B, max_new_tokens, stop_tokens, on_token)
    cache = init_cache(config, B, check_cache_len(cache_len, T + max_new_tokens))
    rng = jax.random.PRNGKey(seed)
    logits_BV, _, cache = prefill(config, variables, jnp.asarray(tokens_BT), jnp.asarray(lengths_B), cache)
    positions_B = jnp.asarray(lengths_B)
    steps = 0
    while True:
        rng, key = jax.random.split(rng)
        next_B = _sample(logits_BV, key, temperature=float(temperature), top_p=float(top_p))
        for row, token in enumerate(np.asarray(next_B).tolist()):
            emitter.emit(row, token)
        if emitter.all_done:
            return Generation(emitter.tokens, steps)
        logits_BV, cache = decode_step(config, variables, next_B, positions_B, cache)
        positions_B = positions_B + 1
        steps += 1
