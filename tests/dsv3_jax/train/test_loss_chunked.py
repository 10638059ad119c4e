"""The loss applies the head a chunk of positions, or of head columns, at a time (no [B, T, V] float32 logits in
training): its values and gradients equal the cross-entropy of the model's full logits, for any chunk size (padded
last chunk included), for the untied and the tied head, with MTP and packed documents."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model import DeepSeekV3, head_logits, head_weight
from dsv3_jax.config.presets import PRESETS
from dsv3_jax.train.loss import head_cross_entropy, shifted_targets, total_loss
from tests.fast_compile import cheap_compiles  # noqa: F401 - autouse fixture
from tests.hf_oracle import random_variables

B, T = 2, 12
TINY = PRESETS["tiny"].replace(n_layers=2, vocab_size=96)
SEGMENTS = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], np.int32)   # two documents; padding (0) at the end
MTP_WEIGHT, ALPHA = 0.3, 1e-2


def close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def reference_sums(logits_BTV, targets_BT, weights_BT):
    """Σ w·CE and Σ w·logsumexp² from whole logits."""
    logp = jax.nn.log_softmax(logits_BTV, axis=-1)
    ce_BT = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    return (ce_BT * weights_BT).sum(), (lse_BT**2 * weights_BT).sum()


def head_problem(seed, D, V, scale):
    """x [B, T, D], w [D, V], targets and 0/1 weights (about 30% zero), drawn from `seed`."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    x_BTD = jax.random.normal(keys[0], (B, T, D))
    w_DV = jax.random.normal(keys[1], (D, V)) * scale
    targets_BT = jax.random.randint(keys[2], (B, T), 0, V)
    weights_BT = (jax.random.uniform(keys[3], (B, T)) > 0.3).astype(jnp.float32)
    return x_BTD, w_DV, targets_BT, weights_BT


@pytest.mark.parametrize("chunk, vocab_chunk", [(0, 0), (1, 0), (4, 0), (5, 0), (12, 0), (100, 0), (0, 7), (0, 40),
                                               (0, 64)])
def test_head_cross_entropy_equals_whole_logits(chunk, vocab_chunk):
    x_BTD, w_DV, targets_BT, weights_BT = head_problem(0, 16, 40, 0.5)
    logits_fn = lambda w, x: jnp.dot(x, w)

    def both(fn):
        value = lambda w, x: (lambda s: s[0] + 0.5 * s[1])(fn(w, x))
        return fn(w_DV, x_BTD), jax.grad(value, argnums=(0, 1))(w_DV, x_BTD)

    got, got_grads = jax.jit(lambda: both(lambda w, x: head_cross_entropy(logits_fn, w, x, targets_BT, weights_BT,
                                                                          chunk, vocab_chunk=vocab_chunk)))()
    want, want_grads = both(lambda w, x: reference_sums(logits_fn(w, x), targets_BT, weights_BT))
    for g, w in zip(got + got_grads, want + want_grads):
        close(g, w)


@pytest.mark.parametrize("chunk, vocab_chunk", [(5, 0), (0, 7)])
def test_head_cross_entropy_in_bfloat16_is_close_to_whole_logits(chunk, vocab_chunk):
    """A bfloat16 head (w cast once, d logits multiplied out in bfloat16 with float32 sums): the loss as the whole
    logits', the gradients within bfloat16 rounding."""
    x_BTD, w_DV, targets_BT, weights_BT = head_problem(3, 64, 96, 0.2)
    logits_fn = lambda w, x: jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    value = lambda fn: lambda w, x: (lambda s: s[0] + 0.5 * s[1])(fn(w, x))
    got_fn = lambda w, x: head_cross_entropy(logits_fn, w, x, targets_BT, weights_BT, chunk, jnp.bfloat16,
                                             vocab_chunk)
    want_fn = lambda w, x: reference_sums(logits_fn(w, x), targets_BT, weights_BT)
    got, got_grads = jax.jit(jax.value_and_grad(value(got_fn), argnums=(0, 1)))(w_DV, x_BTD)
    want, want_grads = jax.value_and_grad(value(want_fn), argnums=(0, 1))(w_DV, x_BTD)
    close(got, want, tol=1e-5)
    for g, w in zip(got_grads, want_grads):
        close(g, w, tol=2e-2)
        assert np.corrcoef(np.ravel(g), np.ravel(w))[0, 1] > 0.999


def reference_loss(config, params, moe_bias, tokens, segment_ids):
    """total_loss's function, from the model's whole logits (return_aux=True)."""
    out = DeepSeekV3(config).apply({"params": params, "moe_bias": moe_bias}, tokens, None, segment_ids,
                                   return_aux=True)
    mean_ce = lambda logits, offset: (lambda t, v: reference_sums(logits, t, v.astype(jnp.float32))[0]
                                      / v.sum())(*shifted_targets(tokens, segment_ids, offset))
    mtp = jnp.mean(jnp.stack([mean_ce(out.mtp_logits_ZBTV[d], d + 2) for d in range(config.num_mtp_modules)]))
    balance = out.moe_stats.balance_loss.sum() + out.mtp_stats.balance_loss.sum()
    return mean_ce(out.logits_BTV, 1) + MTP_WEIGHT * mtp + ALPHA * balance


def chunked_loss(config, chunk, vocab_chunk, params, moe_bias, tokens, segment_ids):
    """What the train step's loss_fn computes: the model with logits=False, then total_loss."""
    out = DeepSeekV3(config).apply({"params": params, "moe_bias": moe_bias}, tokens, None, segment_ids,
                                   return_aux=True, logits=False)
    assert out.logits_BTV is None and out.mtp_logits_ZBTV is None
    assert out.head_in_BTD.shape == (B, T, config.dim)
    assert out.mtp_head_in_ZBTD.shape == (config.num_mtp_modules, B, T, config.dim)
    return total_loss(out, functools.partial(head_logits, config), head_weight(config, params), tokens, segment_ids,
                      MTP_WEIGHT, ALPHA, chunk=chunk, w_dtype=config.jnp_dtype, vocab_chunk=vocab_chunk)[0]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_train_loss_and_gradients_equal_the_whole_logits_loss(tied):
    config = TINY.replace(tie_word_embeddings=tied, num_mtp_modules=2)
    variables = random_variables(config, seed=1)
    params, moe_bias = variables["params"], variables.get("moe_bias", {})
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, config.vocab_size)
    segment_ids = jnp.asarray(SEGMENTS)
    grad = lambda fn: jax.jit(jax.value_and_grad(fn))(params, moe_bias, tokens, segment_ids)
    want, want_grads = grad(functools.partial(reference_loss, config))
    # whole sequence; chunks of 5 positions with a padded last one; chunks of 7 head columns (96 = 13 · 7 + 5)
    for chunk, vocab_chunk in ((0, 0), (5, 0), (0, 7)):
        got, got_grads = grad(functools.partial(chunked_loss, config, chunk, vocab_chunk))
        close(got, want)
        assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            close(g, w)
    head = want_grads["embed"]["embedding"] if tied else want_grads["lm_head"]["kernel"]
    assert np.abs(np.asarray(head)).max() > 0
