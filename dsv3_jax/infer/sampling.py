"""Choosing the next token from float32 logits: greedy (temperature 0), or temperature + nucleus (top-p);
`token_probs` is the distribution those choices draw from (speculative sampling compares two of them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_filter(logits_BV, top_p: float):
    """Logits outside the smallest set of most likely tokens whose probability reaches `top_p` set to -inf."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV   # mass strictly more likely than each token
    kept_BV = before_BV < top_p                           # the most likely token is always kept
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def sample_tokens(logits_BV, rng, temperature: float = 0.0, top_p: float = 1.0):
    """int32 (B,) next tokens; temperature 0 is argmax (then rng and top_p are unused)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        logits_BV = top_p_filter(logits_BV, top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def token_probs(logits_BV, temperature=0.0, top_p=1.0):
    """float32 (..., V): the distribution `sample_tokens` draws from; one-hot at the argmax for temperature 0.
    `temperature` and `top_p` may be traced scalars (one compiled function serves every setting)."""
    logits_BV = logits_BV.astype(jnp.float32)
    lead, V = logits_BV.shape[:-1], logits_BV.shape[-1]

    def greedy(logits):
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)

    def sampled(logits):
        logits = logits / temperature
        logits = jax.lax.cond(top_p < 1.0, lambda x: top_p_filter(x.reshape(-1, V), top_p).reshape(*lead, V),
                              lambda x: x, logits)
        return jax.nn.softmax(logits, axis=-1)

    return jax.lax.cond(temperature == 0.0, greedy, sampled, logits_BV)
