"""Inference on a shrunk `tiny` preset (float32, YaRN on): cached decode against the full forward, absorbed
against naive MLA, batched against per-sequence generation, stop tokens, and MTP speculation against greedy.

Compilation dominates on a CPU, so every generation here shares one cache length and few batch shapes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import YarnConfig
from dsv3_jax.infer import (attend_absorbed, attend_naive, decode_step, forward_with_cache, generate,
                            generate_speculative, init_cache, sample_tokens, top_p_filter,
                            values_per_token_per_layer)
from dsv3_jax.infer.cache import visible_slots
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.presets import PRESETS

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


def agreeing_variables(variables):
    """Every block an identity (zero output projections) and MTP's projection keeping only the embedding, all
    norm scales 1: the next token is a function of the current one, and MTP computes the same function one
    step ahead, so every draft should be accepted."""
    D = CONFIG.dim

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
    assert cache.dense.latent_LBSC.shape == (1, 2, CACHE_LEN, 32) and cache.moe.rope_LBSR.shape == (2, 2, CACHE_LEN, 8)
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


def test_speculative_equals_greedy(variables, greedy):
    spec = generate_speculative(CONFIG, variables, PROMPTS, NEW, cache_len=CACHE_LEN)
    assert spec.tokens == greedy.tokens
    assert spec.drafted > 0 and 0.0 <= spec.acceptance_rate <= 1.0


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_speculative_with_agreeing_mtp(variables, noise):
    """Noise on MTP's projection makes some drafts fail: rows then advance by different amounts per step."""
    agreeing = agreeing_variables(variables)
    kernel = agreeing["params"]["mtp_0"]["eh_proj"]["kernel"]
    agreeing["params"]["mtp_0"]["eh_proj"]["kernel"] = kernel + noise * jax.random.normal(
        jax.random.PRNGKey(3), kernel.shape)
    reference = generate(CONFIG, agreeing, PROMPTS, NEW, cache_len=CACHE_LEN)
    spec = generate_speculative(CONFIG, agreeing, PROMPTS, NEW, cache_len=CACHE_LEN)
    assert spec.tokens == reference.tokens
    if noise == 0.0:
        assert spec.acceptance_rate == 1.0
        assert spec.decode_steps <= NEW // 2   # two tokens per main-model step
    else:
        assert 0.0 < spec.acceptance_rate < 1.0


def test_sampling():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7)
    assert np.isfinite(np.asarray(kept)).tolist() == [[True, True, False, False]]
    assert int(sample_tokens(logits, None)[0]) == 0
    draws = [int(sample_tokens(logits, jax.random.PRNGKey(s), temperature=1.0, top_p=0.7)[0]) for s in range(20)]
    assert set(draws) <= {0, 1} and len(set(draws)) == 2
