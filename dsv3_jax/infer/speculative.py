"""Speculative decoding: MTP module 0 drafts Z tokens, the main model verifies them in one step of length Z+1.
At temperature 0 the output is greedy decoding's exactly; otherwise it is distributed as plain sampling.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.cache import DecodeCache, init_cache
from dsv3_jax.infer.decode import (Emitter, Generation, check_cache_len, forward_with_cache, mtp_with_cache,
                                   pad_prompts, serving_kernels)
from dsv3_jax.infer.sampling import token_probs


def draw(q_BV, key):
    """int32 tokens drawn from the probabilities q (the argmax when q is one-hot)."""
    return jax.random.categorical(key, jnp.log(q_BV), axis=-1).astype(jnp.int32)


def accept_drafts(p_BTV, q_BZV, drafts_BZ, key):
    """The accept/reject rule on probabilities: p_BTV the main model's Z+1 distributions, q_BZV the drafts'.
    Returns (accepted_B, tokens_BT): the row emits tokens[:accepted + 1], its kept drafts and then the
    correction (or, all Z kept, the bonus token).

    Speculative sampling: the main model ran [last, d_1 .. d_Z] and gave p_0 .. p_Z; draft d_k is kept with
    probability min(1, p_{k-1}(d_k) / q_k(d_k)) while every draft before it was kept; at the first rejection the
    step's last token is drawn from normalize(max(0, p - q)) at that position, and after Z acceptances from p_Z. A
    step emits 1..Z+1 tokens, distributed as plain sampling with the same temperature and top-p. At temperature 0
    p and q are one-hot at their argmax: a draft is kept iff it is the main model's argmax and the correction is
    that argmax, so the output is greedy decoding's exactly."""
    B, Z = drafts_BZ.shape
    rows_B = jnp.arange(B)
    accept_key, residual_key = jax.random.split(key)
    p_draft_BZ = jnp.take_along_axis(p_BTV[:, :Z], drafts_BZ[..., None], axis=-1)[..., 0]
    q_draft_BZ = jnp.take_along_axis(q_BZV, drafts_BZ[..., None], axis=-1)[..., 0]
    kept_BZ = jax.random.uniform(accept_key, (B, Z)) * q_draft_BZ < p_draft_BZ   # u < p/q; q(d) > 0 as d ~ q
    accepted_B = jnp.sum(jnp.cumprod(kept_BZ.astype(jnp.int32), axis=1), axis=1)
    p_BV = p_BTV[rows_B, accepted_B]
    q_BV = jnp.concatenate([q_BZV, jnp.zeros_like(q_BZV[:, :1])], axis=1)[rows_B, accepted_B]   # 0 after Z
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    residual_BV = jnp.where(jnp.sum(residual_BV, axis=-1, keepdims=True) > 0, residual_BV, p_BV)
    last_B = draw(residual_BV, residual_key)
    tokens_BT = jnp.pad(drafts_BZ, ((0, 0), (0, 1))).at[rows_B, accepted_B].set(last_B)
    return accepted_B, tokens_BT


def _draft_chain(config, kernels, variables, logits_BV, hidden_BD, positions_B, cache, key, n_draft, temperature,
                 top_p):
    """Z drafts from MTP's logits and hidden output at `positions_B`: (drafts_BZ, q_BZV, cache). Drafts after the
    first rerun MTP one position further on, over its own hidden state and the previous draft (a scan: one
    compiled MTP call whatever Z).

    MTP at position j reads a hidden state for j and the token at j+1 and gives logits for the token at j+2.
    Draft 1 uses the main model's hidden state; draft k+1 runs the module again one position further on, with its
    own output hidden state in place of the main model's (not computed yet) and draft k as the token: the module
    chained autoregressively over its own hidden states. DeepSeek-V3 ships one MTP module, so every depth reuses
    module 0 (as common serving engines do for more than one speculative token); a model with more modules drafts
    with its first only."""
    key, first_key = jax.random.split(key)
    q_BV = token_probs(logits_BV, temperature, top_p)
    draft_B = draw(q_BV, first_key)

    def further(carry, k):
        draft_B, hidden_BD, cache, key = carry
        key, sub = jax.random.split(key)
        logits_B1V, hidden_B1D, cache = mtp_with_cache(config, variables, hidden_BD[:, None], draft_B[:, None],
                                                       (positions_B + k + 1)[:, None], cache, kernels=kernels)
        q_BV = token_probs(logits_B1V[:, 0], temperature, top_p)
        draft_B = draw(q_BV, sub)
        return (draft_B, hidden_B1D[:, 0].astype(hidden_BD.dtype), cache, key), (draft_B, q_BV)

    if n_draft == 1:
        return draft_B[:, None], q_BV[:, None], cache
    (_, _, cache, _), (drafts_ZB, q_ZBV) = jax.lax.scan(further, (draft_B, hidden_BD, cache, key),
                                                        jnp.arange(n_draft - 1, dtype=positions_B.dtype))
    drafts_BZ = jnp.concatenate([draft_B[:, None], drafts_ZB.T], axis=1)
    q_BZV = jnp.concatenate([q_BV[:, None], jnp.moveaxis(q_ZBV, 0, 1)], axis=1)
    return drafts_BZ, q_BZV, cache


@partial(jax.jit, static_argnames=("config", "kernels"), donate_argnames=("cache",))
def speculative_prefill(config: ModelConfig, variables: dict, tokens_BT, lengths_B, cache: DecodeCache, key,
                        temperature=0.0, top_p=1.0, kernels=None):
    """Prompts through the main model and MTP (training-form attention): (first token_B, MTP's logits_BV and
    hidden output_BD at each row's last prompt position, which the first step drafts from, cache)."""
    B, T = tokens_BT.shape
    rows_B = jnp.arange(B)
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTV, hidden_BTD, cache = forward_with_cache(config, variables, tokens_BT, positions_BT, cache,
                                                       absorbed=False, kernels=kernels)
    first_B = draw(token_probs(logits_BTV[rows_B, lengths_B - 1], temperature, top_p), key)
    # MTP at position i reads the token at i + 1: the prompt's own, or the first generated one at the end.
    next_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1))).at[rows_B, lengths_B - 1].set(first_B)
    mtp_logits_BTV, mtp_hidden_BTD, cache = mtp_with_cache(config, variables, hidden_BTD, next_BT, positions_BT,
                                                           cache, absorbed=False, kernels=kernels)
    return first_B, mtp_logits_BTV[rows_B, lengths_B - 1], mtp_hidden_BTD[rows_B, lengths_B - 1], cache


@partial(jax.jit, static_argnames=("config", "n_draft", "kernels"), donate_argnames=("cache",))
def speculative_step(config: ModelConfig, variables: dict, last_B, positions_B, mtp_logits_BV, mtp_hidden_BD,
                     cache: DecodeCache, key, n_draft: int = 1, temperature=0.0, top_p=1.0, kernels=None):
    """Draft Z tokens after `last` (at `positions_B`) from MTP's output one position back, verify [last, drafts]
    at position .. position + Z, and run MTP over the verified positions: (tokens_BT, accepted_B, the next
    last_B, positions_B, mtp_logits_BV, mtp_hidden_BD, cache); the row emits tokens[:accepted + 1].
    `temperature` and `top_p` are traced: one compiled step serves every setting.

    MTP drafts from its output at the position before `last`; the main model verifies [last, drafts]
    (`accept_drafts`); MTP then runs over the verified positions (its entries there overwrite the chain's), and its
    output at the last kept position is what the next step drafts from. Everything stays on the device but the
    tokens."""
    B = last_B.shape[0]
    rows_B = jnp.arange(B)
    accept_key, draft_key = jax.random.split(key)
    drafts_BZ, q_BZV, cache = _draft_chain(config, kernels, variables, mtp_logits_BV, mtp_hidden_BD, positions_B - 1,
                                           cache, draft_key, n_draft, temperature, top_p)
    positions_BT = positions_B[:, None] + jnp.arange(n_draft + 1, dtype=jnp.int32)
    tokens_in_BT = jnp.concatenate([last_B[:, None], drafts_BZ], axis=1)
    logits_BTV, hidden_BTD, cache = forward_with_cache(config, variables, tokens_in_BT, positions_BT, cache,
                                                       kernels=kernels)
    accepted_B, tokens_BT = accept_drafts(token_probs(logits_BTV, temperature, top_p), q_BZV, drafts_BZ, accept_key)
    # MTP at position + k reads the token at position + k + 1, which is tokens_BT[k] for every k <= accepted; its
    # entries further on (and the chain's) are junk that the next step overwrites before any query sees them.
    mtp_logits_BTV, mtp_hidden_BTD, cache = mtp_with_cache(config, variables, hidden_BTD, tokens_BT, positions_BT,
                                                           cache, kernels=kernels)
    return (tokens_BT, accepted_B, tokens_BT[rows_B, accepted_B], positions_B + accepted_B + 1,
            mtp_logits_BTV[rows_B, accepted_B], mtp_hidden_BTD[rows_B, accepted_B], cache)


def generate_speculative(config: ModelConfig, variables: dict, prompts, max_new_tokens: int, *, n_draft: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_tokens=(),
                         on_token=None, cache_len: int | None = None) -> Generation:
    """Generation as `decode.generate` (the same tokens at temperature 0, the same distribution otherwise) with
    `n_draft` MTP drafts per main-model step; the result also counts drafts and accepted drafts.

        result = generate_speculative(config, variables, prompts, 16, n_draft=2)   # greedy's tokens
        result = generate_speculative(config, variables, prompts, 16, temperature=0.7, top_p=0.9)   # same distribution
    """
    if config.num_mtp_modules < 1 or "mtp_0" not in variables["params"]:
        raise ValueError("speculative decoding needs the model's MTP module (num_mtp_modules >= 1)")
    if n_draft < 1:
        raise ValueError(f"n_draft (--draft-tokens) must be at least 1, got {n_draft}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    sampling = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))
    tokens_BT, lengths_B = pad_prompts(prompts)
    B, T = tokens_BT.shape
    emitter = Emitter(B, max_new_tokens, stop_tokens, on_token)
    cache = init_cache(config, B, check_cache_len(cache_len, T + max_new_tokens + n_draft + 1), with_mtp=True)
    rng, key = jax.random.split(jax.random.PRNGKey(seed))
    kernels = serving_kernels(config)
    last_B, mtp_logits_BV, mtp_hidden_BD, cache = speculative_prefill(
        config, variables, jnp.asarray(tokens_BT), jnp.asarray(lengths_B), cache, key, kernels=kernels, **sampling)
    for row, token in enumerate(np.asarray(last_B).tolist()):
        emitter.emit(row, token)
    positions_B = jnp.asarray(lengths_B)
    steps = drafted = accepted = 0
    while not emitter.all_done:
        rng, key = jax.random.split(rng)
        tokens_BT, accepted_B, last_B, positions_B, mtp_logits_BV, mtp_hidden_BD, cache = speculative_step(
            config, variables, last_B, positions_B, mtp_logits_BV, mtp_hidden_BD, cache, key, n_draft=n_draft,
            kernels=kernels, **sampling)
        tokens, kept = np.asarray(tokens_BT), np.asarray(accepted_B)
        steps += 1
        for row in range(B):
            if emitter.done[row]:
                continue
            drafted += n_draft
            accepted += int(kept[row])
            for token in tokens[row, : kept[row] + 1].tolist():
                emitter.emit(row, token)
    return Generation(emitter.tokens, steps, drafted, accepted)
