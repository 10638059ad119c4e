"""Greedy speculative decoding with MTP module 0 as the drafter and the main model as the verifier.

Each step: the main model runs [last token, draft] (absorbed MLA, length 2). Its argmax g0 after `last`
is always right; when g0 equals the draft, its argmax g1 after the draft is right too, so one or two
tokens come out of every main-model step and the output is the greedy output exactly. The MTP module
then takes the main model's hidden state at those positions and the tokens that follow them (its own
latent cache), and drafts the token after the last one kept.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.cache import DecodeCache, init_cache
from dsv3_jax.infer.decode import (Emitter, Generation, check_cache_len, forward_with_cache, mtp_with_cache,
                                   pad_prompts)


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def speculative_prefill(config: ModelConfig, variables: dict, tokens_BP, lengths_B, cache: DecodeCache):
    """Prompt through the main model and MTP (training-form attention): (first token_B, draft_B, cache)."""
    B, P = tokens_BP.shape
    rows_B = jnp.arange(B)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits_BPV, hidden_BPD, cache = forward_with_cache(config, variables, tokens_BP, positions_BP, cache,
                                                       absorbed=False)
    first_B = jnp.argmax(logits_BPV[rows_B, lengths_B - 1], axis=-1).astype(jnp.int32)
    # MTP at position i reads the token at i + 1: the prompt's own, or the first generated one at the end.
    next_BP = jnp.pad(tokens_BP[:, 1:], ((0, 0), (0, 1))).at[rows_B, lengths_B - 1].set(first_B)
    mtp_logits_BPV, cache = mtp_with_cache(config, variables, hidden_BPD, next_BP, positions_BP, cache,
                                           absorbed=False)
    draft_B = jnp.argmax(mtp_logits_BPV[rows_B, lengths_B - 1], axis=-1).astype(jnp.int32)
    return first_B, draft_B, cache


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def speculative_step(config: ModelConfig, variables: dict, last_B, draft_B, positions_B, cache: DecodeCache):
    """Verify [last, draft] at (position, position + 1): (greedy_B2, accepted_B, next draft_B, cache)."""
    B = last_B.shape[0]
    positions_B2 = positions_B[:, None] + jnp.arange(2, dtype=jnp.int32)
    tokens_B2 = jnp.stack([last_B, draft_B], axis=1)
    logits_B2V, hidden_B2D, cache = forward_with_cache(config, variables, tokens_B2, positions_B2, cache)
    greedy_B2 = jnp.argmax(logits_B2V, axis=-1).astype(jnp.int32)
    accepted_B = greedy_B2[:, 0] == draft_B
    # When the draft is rejected, MTP's entry at position + 1 is junk; the next step overwrites it.
    mtp_logits_B2V, cache = mtp_with_cache(config, variables, hidden_B2D, greedy_B2, positions_B2, cache)
    next_draft_B = jnp.argmax(mtp_logits_B2V[jnp.arange(B), accepted_B.astype(jnp.int32)], axis=-1)
    return greedy_B2, accepted_B, next_draft_B.astype(jnp.int32), cache


def generate_speculative(config: ModelConfig, variables: dict, prompts, max_new_tokens: int, *, stop_tokens=(),
                         on_token=None, cache_len: int | None = None) -> Generation:
    """Greedy generation, as `decode.generate(temperature=0)`, with one MTP draft per main-model step;
    the result also counts drafts and accepted drafts."""
    if config.num_mtp_modules < 1 or "mtp_0" not in variables["params"]:
        raise ValueError("speculative decoding needs the model's MTP module (num_mtp_modules >= 1)")
    tokens_BP, lengths_B = pad_prompts(prompts)
    B, P = tokens_BP.shape
    emitter = Emitter(B, max_new_tokens, stop_tokens, on_token)
    cache = init_cache(config, B, check_cache_len(cache_len, P + max_new_tokens + 2), with_mtp=True)
    last_B, draft_B, cache = speculative_prefill(config, variables, jnp.asarray(tokens_BP), jnp.asarray(lengths_B),
                                                 cache)
    last = np.asarray(last_B)
    for row in range(B):
        emitter.emit(row, int(last[row]))
    positions = lengths_B.astype(np.int32)
    steps = drafted = accepted = 0
    while not emitter.all_done:
        greedy_B2, accepted_B, draft_B, cache = speculative_step(config, variables, jnp.asarray(last), draft_B,
                                                                 jnp.asarray(positions), cache)
        greedy, ok = np.asarray(greedy_B2), np.asarray(accepted_B)
        steps += 1
        for row in range(B):
            if emitter.done[row]:
                continue
            drafted += 1
            accepted += int(ok[row])
            emitter.emit(row, int(greedy[row, 0]))
            if ok[row]:
                emitter.emit(row, int(greedy[row, 1]))
        last = np.where(ok, greedy[:, 1], greedy[:, 0]).astype(np.int32)
        positions = positions + 1 + ok.astype(np.int32)
    return Generation(emitter.tokens, steps, drafted, accepted)
