"""Speculative decoding: MTP module 0 drafts N tokens, the main model verifies them in one step of length N+1.

Drafting. MTP at position j reads a hidden state for j and the token at j+1 and gives logits for the token
at j+2. Draft 1 uses the main model's hidden state; draft k+1 runs the module again one position further on,
with its own output hidden state in place of the main model's (not computed yet) and draft k as the token:
the module chained autoregressively over its own hidden states. DeepSeek-V3 ships one MTP module, so every
depth reuses module 0 (vLLM and SGLang do the same for more than one speculative token); a model with more
modules drafts with its first only.

A step: MTP drafts N tokens from its output at the position before `last`; the main model verifies
[last, drafts]; MTP runs over the verified positions (its entries there overwrite the chain's) and its output
at the last kept position is what the next step drafts from. Everything stays on the device but the tokens.

Verification (Leviathan et al. 2023, Chen et al. 2023). The main model runs [last, d_1 .. d_N] and gives
p_0 .. p_N; draft d_k is kept with probability min(1, p_{k-1}(d_k) / q_k(d_k)) while every draft before it
was kept; at the first rejection the step's last token is drawn from normalize(max(0, p - q)) at that
position, and after N acceptances from p_N. A step emits 1..N+1 tokens, distributed as plain sampling with
the same temperature and top-p. At temperature 0 p and q are one-hot at their argmax: a draft is kept iff it
is the main model's argmax and the correction is that argmax, so the output is greedy decoding's exactly.
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
from dsv3_jax.infer.sampling import token_probs


def draw(q_BV, key):
    """int32 tokens drawn from the probabilities q (the argmax when q is one-hot)."""
    return jax.random.categorical(key, jnp.log(q_BV), axis=-1).astype(jnp.int32)


def accept_drafts(p_BKV, q_BNV, drafts_BN, key):
    """The accept/reject rule on probabilities: p_BKV the main model's N+1 distributions, q_BNV the drafts'.
    Returns (accepted_B, tokens_BK): the row emits tokens[:accepted + 1], its kept drafts and then the
    correction (or, all N kept, the bonus token)."""
    B, N = drafts_BN.shape
    rows_B = jnp.arange(B)
    accept_key, residual_key = jax.random.split(key)
    p_draft_BN = jnp.take_along_axis(p_BKV[:, :N], drafts_BN[..., None], axis=-1)[..., 0]
    q_draft_BN = jnp.take_along_axis(q_BNV, drafts_BN[..., None], axis=-1)[..., 0]
    kept_BN = jax.random.uniform(accept_key, (B, N)) * q_draft_BN < p_draft_BN   # u < p/q; q(d) > 0 as d ~ q
    accepted_B = jnp.sum(jnp.cumprod(kept_BN.astype(jnp.int32), axis=1), axis=1)
    p_BV = p_BKV[rows_B, accepted_B]
    q_BV = jnp.concatenate([q_BNV, jnp.zeros_like(q_BNV[:, :1])], axis=1)[rows_B, accepted_B]   # 0 after N
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    residual_BV = jnp.where(jnp.sum(residual_BV, axis=-1, keepdims=True) > 0, residual_BV, p_BV)
    last_B = draw(residual_BV, residual_key)
    tokens_BK = jnp.pad(drafts_BN, ((0, 0), (0, 1))).at[rows_B, accepted_B].set(last_B)
    return accepted_B, tokens_BK


def _draft_chain(config, variables, logits_BV, hidden_BD, positions_B, cache, key, n_draft, temperature, top_p):
    """N drafts from MTP's logits and hidden output at `positions_B`: (drafts_BN, q_BNV, cache). Drafts after the
    first rerun MTP one position further on, over its own hidden state and the previous draft (a scan: one
    compiled MTP call whatever N)."""
    key, first_key = jax.random.split(key)
    q_BV = token_probs(logits_BV, temperature, top_p)
    draft_B = draw(q_BV, first_key)

    def further(carry, k):
        draft_B, hidden_BD, cache, key = carry
        key, sub = jax.random.split(key)
        logits_B1V, hidden_B1D, cache = mtp_with_cache(config, variables, hidden_BD[:, None], draft_B[:, None],
                                                       (positions_B + k + 1)[:, None], cache)
        q_BV = token_probs(logits_B1V[:, 0], temperature, top_p)
        draft_B = draw(q_BV, sub)
        return (draft_B, hidden_B1D[:, 0].astype(hidden_BD.dtype), cache, key), (draft_B, q_BV)

    if n_draft == 1:
        return draft_B[:, None], q_BV[:, None], cache
    (_, _, cache, _), (drafts_KB, q_KBV) = jax.lax.scan(further, (draft_B, hidden_BD, cache, key),
                                                        jnp.arange(n_draft - 1, dtype=positions_B.dtype))
    drafts_BN = jnp.concatenate([draft_B[:, None], drafts_KB.T], axis=1)
    q_BNV = jnp.concatenate([q_BV[:, None], jnp.moveaxis(q_KBV, 0, 1)], axis=1)
    return drafts_BN, q_BNV, cache


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def speculative_prefill(config: ModelConfig, variables: dict, tokens_BP, lengths_B, cache: DecodeCache, key,
                        temperature=0.0, top_p=1.0):
    """Prompts through the main model and MTP (training-form attention): (first token_B, MTP's logits_BV and
    hidden output_BD at each row's last prompt position, which the first step drafts from, cache)."""
    B, P = tokens_BP.shape
    rows_B = jnp.arange(B)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits_BPV, hidden_BPD, cache = forward_with_cache(config, variables, tokens_BP, positions_BP, cache,
                                                       absorbed=False)
    first_B = draw(token_probs(logits_BPV[rows_B, lengths_B - 1], temperature, top_p), key)
    # MTP at position i reads the token at i + 1: the prompt's own, or the first generated one at the end.
    next_BP = jnp.pad(tokens_BP[:, 1:], ((0, 0), (0, 1))).at[rows_B, lengths_B - 1].set(first_B)
    mtp_logits_BPV, mtp_hidden_BPD, cache = mtp_with_cache(config, variables, hidden_BPD, next_BP, positions_BP,
                                                           cache, absorbed=False)
    return first_B, mtp_logits_BPV[rows_B, lengths_B - 1], mtp_hidden_BPD[rows_B, lengths_B - 1], cache


@partial(jax.jit, static_argnames=("config", "n_draft"), donate_argnames=("cache",))
def speculative_step(config: ModelConfig, variables: dict, last_B, positions_B, mtp_logits_BV, mtp_hidden_BD,
                     cache: DecodeCache, key, n_draft: int = 1, temperature=0.0, top_p=1.0):
    """Draft N tokens after `last` (at `positions_B`) from MTP's output one position back, verify [last, drafts]
    at position .. position + N, and run MTP over the verified positions: (tokens_BK, accepted_B, the next
    last_B, positions_B, mtp_logits_BV, mtp_hidden_BD, cache); the row emits tokens[:accepted + 1].
    `temperature` and `top_p` are traced: one compiled step serves every setting."""
    B = last_B.shape[0]
    rows_B = jnp.arange(B)
    accept_key, draft_key = jax.random.split(key)
    drafts_BN, q_BNV, cache = _draft_chain(config, variables, mtp_logits_BV, mtp_hidden_BD, positions_B - 1, cache,
                                           draft_key, n_draft, temperature, top_p)
    positions_BK = positions_B[:, None] + jnp.arange(n_draft + 1, dtype=jnp.int32)
    tokens_in_BK = jnp.concatenate([last_B[:, None], drafts_BN], axis=1)
    logits_BKV, hidden_BKD, cache = forward_with_cache(config, variables, tokens_in_BK, positions_BK, cache)
    accepted_B, tokens_BK = accept_drafts(token_probs(logits_BKV, temperature, top_p), q_BNV, drafts_BN, accept_key)
    # MTP at position + k reads the token at position + k + 1, which is tokens_BK[k] for every k <= accepted; its
    # entries further on (and the chain's) are junk that the next step overwrites before any query sees them.
    mtp_logits_BKV, mtp_hidden_BKD, cache = mtp_with_cache(config, variables, hidden_BKD, tokens_BK, positions_BK,
                                                           cache)
    return (tokens_BK, accepted_B, tokens_BK[rows_B, accepted_B], positions_B + accepted_B + 1,
            mtp_logits_BKV[rows_B, accepted_B], mtp_hidden_BKD[rows_B, accepted_B], cache)


def generate_speculative(config: ModelConfig, variables: dict, prompts, max_new_tokens: int, *, n_draft: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_tokens=(),
                         on_token=None, cache_len: int | None = None) -> Generation:
    """Generation as `decode.generate` (the same tokens at temperature 0, the same distribution otherwise) with
    `n_draft` MTP drafts per main-model step; the result also counts drafts and accepted drafts."""
    if config.num_mtp_modules < 1 or "mtp_0" not in variables["params"]:
        raise ValueError("speculative decoding needs the model's MTP module (num_mtp_modules >= 1)")
    if n_draft < 1:
        raise ValueError(f"n_draft (--draft-tokens) must be at least 1, got {n_draft}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    sampling = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))
    tokens_BP, lengths_B = pad_prompts(prompts)
    B, P = tokens_BP.shape
    emitter = Emitter(B, max_new_tokens, stop_tokens, on_token)
    cache = init_cache(config, B, check_cache_len(cache_len, P + max_new_tokens + n_draft + 1), with_mtp=True)
    rng, key = jax.random.split(jax.random.PRNGKey(seed))
    last_B, mtp_logits_BV, mtp_hidden_BD, cache = speculative_prefill(
        config, variables, jnp.asarray(tokens_BP), jnp.asarray(lengths_B), cache, key, **sampling)
    for row, token in enumerate(np.asarray(last_B).tolist()):
        emitter.emit(row, token)
    positions_B = jnp.asarray(lengths_B)
    steps = drafted = accepted = 0
    while not emitter.all_done:
        rng, key = jax.random.split(rng)
        tokens_BK, accepted_B, last_B, positions_B, mtp_logits_BV, mtp_hidden_BD, cache = speculative_step(
            config, variables, last_B, positions_B, mtp_logits_BV, mtp_hidden_BD, cache, key, n_draft=n_draft,
            **sampling)
        tokens, kept = np.asarray(tokens_BK), np.asarray(accepted_B)
        steps += 1
        for row in range(B):
            if emitter.done[row]:
                continue
            drafted += n_draft
            accepted += int(kept[row])
            for token in tokens[row, : kept[row] + 1].tolist():
                emitter.emit(row, token)
    return Generation(emitter.tokens, steps, drafted, accepted)
