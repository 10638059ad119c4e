"""Inference on a shrunk `tiny` preset (float32, YaRN on): cached decode against the full forward, absorbed
against naive MLA, batched against per-sequence generation, stop tokens, MTP speculation (1-3 drafts) against
greedy, and the speculative-sampling accept/reject rule against its target distribution.

Compilation dominates on a CPU, so every generation here shares one cache length and few batch shapes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import YarnConfig
from dsv3_jax.infer import (accept_drafts, attend_absorbed, attend_naive, decode_step, forward_with_cache,
                            generate, generate_speculative, init_cache, sample_tokens, token_probs, top_p_filter,
                            values_per_token_per_layer)
from dsv3_jax.model.layers.mla import visible_slots
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.config.presets import PRESETS
from experiments.bench.decode import all_accepting

CONFIG = PRESETS["tiny"].replace(vocab_size=512, rope_scaling=YarnConfig(
    factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0))
CACHE_LEN = 24
NEW = 8
PROMPTS = [[5, 7, 9, 11, 3], [100, 200], [42, 43, 44]]


def random_variables(config, seed=0, std=0.05):
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        DeepSeekV3(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "['scale']" in name:
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        elif "moe_bias" in name:
            value = 0.01 * rng.normal(size=leaf.shape)
        else:
            value = std * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def variables():
    return random_variables(CONFIG)


@pytest.fixture(scope="module")
def greedy(variables):
    return generate(CONFIG, variables, PROMPTS, NEW, cache_len=CACHE_LEN)


def test_cache_holds_latent_and_rope_key_only():
    assert values_per_token_per_layer(CONFIG) == 32 + 8
    assert values_per_token_per_layer(PRESETS["v3-671b"]) == 576
    cache = init_cache(CONFIG, batch=2, max_len=CACHE_LEN)
    assert cache.dense.latent_LBSW.shape == (1, 2, CACHE_LEN, 32) and cache.moe.rope_LBSR.shape == (2, 2, CACHE_LEN, 8)
    assert cache.mtp is None


def test_absorbed_attention_equals_naive():
    c = CONFIG
    B, T, S = 2, 3, 7
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    p = {"wkv_b": {"kernel": jax.random.normal(keys[0], (c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim
                                                                                     + c.v_head_dim)))}}
    q_nope = jax.random.normal(keys[1], (B, T, c.n_heads, c.qk_nope_head_dim))
    q_rope = jax.random.normal(keys[2], (B, T, c.n_heads, c.qk_rope_head_dim))
    latent = jax.random.normal(keys[3], (B, S, c.kv_lora_rank))
    k_rope = jax.random.normal(keys[4], (B, S, c.qk_rope_head_dim))
    visible = visible_slots(jnp.array([[2, 3, 4], [4, 5, 6]]), S)
    naive = attend_naive(c, p, q_nope, q_rope, latent, k_rope, visible)
    absorbed = attend_absorbed(c, p, q_nope, q_rope, latent, k_rope, visible)
    np.testing.assert_allclose(absorbed, naive, atol=1e-4, rtol=1e-4)


def test_cached_decode_equals_full_forward(variables):
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, CONFIG.vocab_size)
    full = DeepSeekV3(CONFIG).apply(variables, tokens)
    assert float(jnp.abs(full).max()) > 0.1   # the weights carry signal
    P = 4
    cache = init_cache(CONFIG, 2, CACHE_LEN)
    prefill_fn = jax.jit(forward_with_cache, static_argnames=("config", "absorbed"))
    logits, _, cache = prefill_fn(CONFIG, variables, tokens[:, :P], jnp.broadcast_to(jnp.arange(P), (2, P)),
                                  cache, absorbed=False)
    np.testing.assert_allclose(logits, full[:, :P], atol=1e-4, rtol=0)
    for t in range(P, tokens.shape[1]):
        step_logits, cache = decode_step(CONFIG, variables, tokens[:, t], jnp.full((2,), t, jnp.int32), cache)
        np.testing.assert_allclose(step_logits, full[:, t], atol=1e-4, rtol=0)


def test_batched_generation_equals_per_sequence(variables, greedy):
    assert [len(t) for t in greedy.tokens] == [NEW] * len(PROMPTS)
    for row in (0, 1):   # the longest prompt and a padded one
        alone = generate(CONFIG, variables, [PROMPTS[row]], NEW, cache_len=CACHE_LEN)
        assert alone.tokens[0] == greedy.tokens[row]


def test_stop_tokens_end_rows(variables, greedy):
    stop = greedy.tokens[0][2]
    streamed = []
    result = generate(CONFIG, variables, PROMPTS, NEW, stop_tokens=[stop], cache_len=CACHE_LEN,
                      on_token=lambda row, token: streamed.append((row, token)))
    for row, tokens in enumerate(greedy.tokens):
        end = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert result.tokens[row] == tokens[:end]
        assert [t for r, t in streamed if r == row] == tokens[:end]


@pytest.fixture(scope="module")
def agreeing(variables):
    return all_accepting(CONFIG, variables)   # every MTP draft right


@pytest.fixture(scope="module")
def agreeing_greedy(agreeing):
    return generate(CONFIG, agreeing, PROMPTS, NEW, cache_len=CACHE_LEN)


def noisy_mtp(variables, noise=0.05):
    """Noise on MTP's projection makes some drafts fail: rows then advance by different amounts per step."""
    kernel = variables["params"]["mtp_0"]["eh_proj"]["kernel"]
    noisy = jax.tree.map(lambda x: x, variables)
    noisy["params"]["mtp_0"]["eh_proj"]["kernel"] = kernel + noise * jax.random.normal(jax.random.PRNGKey(3),
                                                                                       kernel.shape)
    return noisy


@pytest.mark.parametrize("n_draft", [1, 2, 3])
def test_speculative_equals_greedy(variables, greedy, agreeing, agreeing_greedy, n_draft):
    """N drafts per step, verified in one main-model step of N + 1: greedy's tokens, whatever the drafts."""
    spec = generate_speculative(CONFIG, variables, PROMPTS, NEW, n_draft=n_draft, cache_len=CACHE_LEN)
    assert spec.tokens == greedy.tokens
    assert spec.drafted > 0 and 0.0 <= spec.acceptance_rate <= 1.0

    exact = generate_speculative(CONFIG, agreeing, PROMPTS, NEW, n_draft=n_draft, cache_len=CACHE_LEN)
    assert exact.tokens == agreeing_greedy.tokens
    assert exact.acceptance_rate == 1.0   # the chained drafts are all right: N + 1 tokens per main-model step
    assert exact.decode_steps == math.ceil((NEW - 1) / (n_draft + 1))

    noisy = generate_speculative(CONFIG, noisy_mtp(agreeing), PROMPTS, NEW, n_draft=n_draft, cache_len=CACHE_LEN)
    assert noisy.tokens == agreeing_greedy.tokens   # MTP's change does not touch the main model
    assert 0.0 < noisy.acceptance_rate < 1.0


def test_speculative_sampling_runs_with_agreeing_drafts(agreeing):
    """With temperature and top-p, drafts whose distribution equals the main model's are (nearly) always kept;
    a q misaligned with its draft would reject most of them."""
    spec = generate_speculative(CONFIG, agreeing, PROMPTS, NEW, n_draft=2, temperature=0.8, top_p=0.9, seed=1,
                                cache_len=CACHE_LEN)
    assert [len(t) for t in spec.tokens] == [NEW] * len(PROMPTS)
    assert spec.acceptance_rate > 0.95
    assert all(0 <= t < CONFIG.vocab_size for row in spec.tokens for t in row)


def total_variation(samples, probs):
    counts = np.bincount(samples, minlength=len(probs)) / len(samples)
    return 0.5 * float(np.abs(counts - probs).sum())


def test_accept_rule_reproduces_the_target_distribution():
    """One step of the accept/reject rule, 200k rows at once (fixed seed): the first emitted token follows p_0,
    the second (rows that kept draft 1) p_1, the third p_2, although the drafts follow q."""
    rng = np.random.default_rng(0)
    V, N, M = 6, 2, 200_000
    p_KV = rng.dirichlet(np.ones(V), N + 1).astype(np.float32)
    q_NV = rng.dirichlet(np.ones(V), N).astype(np.float32)
    q_NV[0, 0] = 0.0                  # a token the drafter never proposes but the target may
    q_NV[0] /= q_NV[0].sum()
    for k in range(N):
        assert 0.5 * np.abs(p_KV[k] - q_NV[k]).sum() > 0.15   # drafts alone would be far off
    draft_keys = jax.random.split(jax.random.PRNGKey(0), N)
    drafts = jnp.stack([jax.random.categorical(draft_keys[k], jnp.log(jnp.broadcast_to(q_NV[k], (M, V))))
                        for k in range(N)], axis=1).astype(jnp.int32)
    accepted, tokens = jax.jit(accept_drafts)(jnp.broadcast_to(p_KV, (M, N + 1, V)),
                                              jnp.broadcast_to(q_NV, (M, N, V)), drafts, jax.random.PRNGKey(1))
    accepted, tokens = np.asarray(accepted), np.asarray(tokens)
    for k in range(N + 1):
        rows = accepted >= k
        assert rows.sum() > 20_000
        assert total_variation(tokens[rows, k], p_KV[k]) < 0.01, k
    kept = accepted >= 1
    assert np.array_equal(tokens[kept, 0], np.asarray(drafts)[kept, 0])   # a kept draft is emitted as drafted


def test_accept_rule_at_temperature_zero_is_greedy():
    """One-hot p and q (temperature 0): drafts kept while they equal the main model's argmax, then the argmax."""
    B, N, V = 64, 3, 11
    logits = jax.random.normal(jax.random.PRNGKey(4), (B, N + 1, V))
    greedy_BK = np.asarray(jnp.argmax(logits, axis=-1))
    rng = np.random.default_rng(1)
    drafts = np.where(rng.random((B, N)) < 0.6, greedy_BK[:, :N], rng.integers(0, V, (B, N))).astype(np.int32)
    q = jax.nn.one_hot(drafts, V)
    accept = jax.jit(lambda logits, q, drafts, key: accept_drafts(token_probs(logits), q, drafts, key))
    for seed in range(3):
        accepted, tokens = accept(logits, q, jnp.asarray(drafts), jax.random.PRNGKey(seed))
        accepted, tokens = np.asarray(accepted), np.asarray(tokens)
        for b in range(B):
            n = 0
            while n < N and drafts[b, n] == greedy_BK[b, n]:
                n += 1
            assert accepted[b] == n
            assert tokens[b, : n + 1].tolist() == greedy_BK[b, : n + 1].tolist()


def test_sampling():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7)
    assert np.isfinite(np.asarray(kept)).tolist() == [[True, True, False, False]]
    assert int(sample_tokens(logits, None)[0]) == 0
    draws = [int(sample_tokens(logits, jax.random.PRNGKey(s), temperature=1.0, top_p=0.7)[0]) for s in range(20)]
    assert set(draws) <= {0, 1} and len(set(draws)) == 2
    probs = np.asarray(token_probs(logits, temperature=0.5, top_p=0.7))   # what those draws follow
    np.testing.assert_allclose(probs, [[0.5 ** 2 / 0.34, 0.3 ** 2 / 0.34, 0, 0]], rtol=1e-5)
    assert np.asarray(token_probs(logits)).tolist() == [[1.0, 0.0, 0.0, 0.0]]
