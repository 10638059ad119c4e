"""The train step: loss falls, micro-batch accumulation equals one large batch (also when the micro-batches hold
different numbers of real tokens), padding stays out of the bias update and the balance loss, the skip guard keeps
the state, the routing bias moves outside the optimizer, the MTP weight switches, norms take no decay."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import get_preset
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.train.balance import bias_step
from dsv3_jax.kernels import REFERENCE
from dsv3_jax.train.loss import LossConfig
from dsv3_jax.train.optimizer import OptimizerConfig, decay_mask
from dsv3_jax.train.schedule import ScheduleConfig
from dsv3_jax.train.step import BalanceConfig, apply_update, create_train_state, make_accumulate, make_train_step
from tests.fast_compile import cheap_compiles  # noqa: F401 - autouse fixture

CONFIG = get_preset("tiny").replace(n_layers=2, vocab_size=64, dtype="float32")
NO_LIMIT = jnp.float32(np.inf)
SCHEDULE, BALANCE = ScheduleConfig(peak_lr=1e-2, warmup=1, decay=0), BalanceConfig(gamma=0.01)


@functools.lru_cache(maxsize=None)
def jitted_step(loss=LossConfig(), eps=1e-3):
    # eps well above float noise, so Adam's first step g / (|g| + eps) is continuous in g.
    tx, step = make_train_step(CONFIG, REFERENCE, loss, SCHEDULE, OptimizerConfig(eps=eps), BALANCE)
    return tx, jax.jit(step)


@functools.lru_cache(maxsize=None)
def fresh_state(loss=LossConfig()):
    tx, _ = jitted_step(loss)
    return jax.jit(create_train_state, static_argnums=(0, 1))(CONFIG, tx, jax.random.PRNGKey(0))


def periodic_tokens(batch, length, seed):
    """Rows of a repeating 8-token pattern from random offsets: learnable, so the loss must fall."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, CONFIG.vocab_size, 8)
    starts = rng.integers(0, 8, batch)
    return np.stack([pattern[(s + np.arange(length)) % 8] for s in starts]).astype(np.int32)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))     # NaN equals NaN here


def test_loss_falls_on_a_learnable_stream():
    _, step = jitted_step()
    state = fresh_state()
    losses = []
    for i in range(25):
        tokens = periodic_tokens(4, 32, seed=0)[None]
        state, metrics = step(state, {"tokens": jnp.asarray(tokens)}, jnp.float32(i * 128), NO_LIMIT)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 0.9 * np.log(CONFIG.vocab_size)     # starts near uniform
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 25


def test_accumulated_micro_batches_equal_one_batch():
    _, step = jitted_step()
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, 16)).astype(np.int32)
    one, m_one = step(fresh_state(), {"tokens": jnp.asarray(tokens[None])}, jnp.float32(0), NO_LIMIT)
    two, m_two = step(fresh_state(), {"tokens": jnp.asarray(tokens.reshape(2, 2, 16))}, jnp.float32(0), NO_LIMIT)
    assert float(m_one["loss"]) == pytest.approx(float(m_two["loss"]), rel=1e-5)
    np.testing.assert_array_equal(np.asarray(m_one["expert_counts_LE"]), np.asarray(m_two["expert_counts_LE"]))
    for a, b in zip(jax.tree.leaves((one.params, one.moe_bias)), jax.tree.leaves((two.params, two.moe_bias))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# Packed rows with padding (segment 0) at the end of rows 2 and 3: as micro-batches of two rows, the first holds 32
# real tokens and the second 10. The padding holds ordinary token ids: only the segment ids mark it.
SEGMENTS = np.array([[1] * 9 + [2] * 7, [1] * 16, [1] * 5 + [0] * 11, [1] * 2 + [2] * 3 + [0] * 11], np.int32)
REAL = 5   # rows 2 and 3 cut to their real tokens


def padded_batch(seed, shape=(1, 4, 16)):
    tokens = np.random.default_rng(seed).integers(1, CONFIG.vocab_size, SEGMENTS.shape).astype(np.int32)
    return {"tokens": jnp.asarray(tokens.reshape(shape)), "segment_ids": jnp.asarray(SEGMENTS.reshape(shape))}


@functools.lru_cache(maxsize=None)
def jitted_accumulate():
    return jax.jit(make_accumulate(CONFIG, REFERENCE, LossConfig()))


@functools.lru_cache(maxsize=None)
def jitted_router_stats():
    def stats(variables, tokens, segment_ids):
        out = DeepSeekV3(CONFIG).apply(variables, tokens, None, segment_ids, return_aux=True, logits=False)
        return out.moe_stats, out.mtp_stats
    return jax.jit(stats)


def test_padding_stays_out_of_the_bias_update_and_the_balance_loss():
    """The step's routing-bias update and balance loss on padded rows are those of the same rows with the padding
    cut off (rows 0-1 whole, rows 2-3 their first 5 tokens), for the MoE layer's router and the MTP module's. The
    step runs as its two halves, make_accumulate then apply_update (step_fn is exactly these), so that it shares
    the next test's compile of the accumulation."""
    tx, _ = jitted_step()
    state = fresh_state()
    batch = padded_batch(5)
    grads, metrics, aux = jitted_accumulate()(state.params, state.moe_bias, batch, jnp.float32(0.3))
    update = jax.jit(functools.partial(apply_update, tx, SCHEDULE, BALANCE))
    new, metrics = update(state, grads, metrics, aux, jnp.float32(0), NO_LIMIT)

    variables = {"params": state.params, "moe_bias": state.moe_bias}
    tokens, segments = batch["tokens"][0], batch["segment_ids"][0]
    whole = jitted_router_stats()(variables, tokens[:2], segments[:2])
    cut = jitted_router_stats()(variables, tokens[2:, :REAL], segments[2:, :REAL])
    balance = 0.0
    for index, path in enumerate((("moe_layers",), ("mtp_0", "block"))):
        router_of = lambda bias: functools.reduce(lambda tree, key: tree[key], path, bias)["moe"]["router"]["bias"]
        old_bias = router_of(state.moe_bias)   # (layers, E) for the MoE stack, (E,) for the MTP module
        counts = (whole[index].expert_counts_E + cut[index].expert_counts_E).reshape(old_bias.shape)
        np.testing.assert_array_equal(np.asarray(router_of(new.moe_bias)), np.asarray(bias_step(old_bias, counts, 0.01)))
        balance += float((whole[index].balance_loss.sum() + cut[index].balance_loss.sum()) / 2)   # 2 rows each
    np.testing.assert_allclose(float(metrics["balance"]), balance, rtol=1e-5)
    # Only real tokens were counted: K per real token in the MoE layer (2 layers: 1 dense, 1 MoE).
    assert float(aux.moe_stats.expert_counts_E.sum()) == CONFIG.num_experts_per_tok * (SEGMENTS > 0).sum()


def test_accumulation_weighs_micro_batches_by_their_real_tokens():
    """Micro-batches of 32 and 10 real tokens: the accumulated gradient and loss are one batch's (each cross-entropy
    a sum over all the step's valid targets over their count), not the mean of two per-micro-batch means."""
    accumulate = jitted_accumulate()
    state = fresh_state()
    mtp_weight = jnp.float32(0.3)
    one_grads, one_metrics, _ = accumulate(state.params, state.moe_bias, padded_batch(6), mtp_weight)
    two_grads, two_metrics, _ = accumulate(state.params, state.moe_bias, padded_batch(6, (2, 2, 16)), mtp_weight)
    for key in ("loss", "ce", "mtp_ce", "balance", "tokens"):
        np.testing.assert_allclose(float(two_metrics[key]), float(one_metrics[key]), rtol=1e-5, err_msg=key)
    assert jax.tree.structure(one_grads) == jax.tree.structure(two_grads)
    for a, b in zip(jax.tree.leaves(two_grads), jax.tree.leaves(one_grads)):
        a, b = np.asarray(a), np.asarray(b)
        assert b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_routing_bias_moves_by_gamma_and_takes_no_gradient_step():
    _, step = jitted_step()
    state = fresh_state()
    tokens = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (1, 4, 16)).astype(np.int32)
    new, metrics = step(state, {"tokens": jnp.asarray(tokens)}, jnp.float32(0), NO_LIMIT)
    delta = np.asarray(new.moe_bias["moe_layers"]["moe"]["router"]["bias"])
    counts = np.asarray(metrics["expert_counts_LE"])
    np.testing.assert_allclose(delta, 0.01 * np.sign(counts.mean(-1, keepdims=True) - counts), atol=1e-7)
    assert set(new.params["moe_layers"]["moe"]["router"]) == {"kernel"}     # the bias is no parameter


@pytest.mark.parametrize("poison", ["nan", "spike"])
def test_guard_skips_bad_updates_and_keeps_the_state(poison):
    _, step = jitted_step()
    state = fresh_state()
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CONFIG.vocab_size, (1, 4, 16)).astype(np.int32))
    limit = NO_LIMIT
    if poison == "nan":
        embedding = state.params["embed"]["embedding"]
        state = state.replace(params={**state.params, "embed": {"embedding": embedding.at[0, 0].set(jnp.nan)}})
    else:
        limit = jnp.float32(0.5)     # every real loss is a "spike" above this limit
    new, metrics = step(state, {"tokens": tokens}, jnp.float32(0), limit)
    assert int(metrics["skipped"]) == 1
    assert int(new.step) == int(state.step) + 1
    assert_trees_equal((new.params, new.moe_bias, new.opt_state), (state.params, state.moe_bias, state.opt_state))


def test_mtp_weight_switches_after_the_configured_step():
    loss = LossConfig(mtp_weight=0.3, mtp_weight_after=0.1, mtp_switch_after=1, mtp_switch_unit="steps")
    _, step = jitted_step(loss)
    state = fresh_state(loss)
    tokens = jnp.asarray(periodic_tokens(2, 16, seed=4)[None])
    weights = []
    for _ in range(2):
        state, metrics = step(state, {"tokens": tokens}, jnp.float32(0), NO_LIMIT)
        weights.append(float(metrics["mtp_weight"]))
        ce, mtp, balance = (float(metrics[k]) for k in ("ce", "mtp_ce", "balance"))
        assert float(metrics["loss"]) == pytest.approx(ce + weights[-1] * mtp + 1e-4 * balance, rel=1e-6)
    assert weights == pytest.approx([0.3, 0.1])


def test_weight_decay_skips_norm_scales_only():
    mask = decay_mask(fresh_state().params)
    flat = {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_leaves_with_path(mask)}
    assert all(not v for k, v in flat.items() if k.endswith("['scale']"))
    assert all(v for k, v in flat.items() if not k.endswith("['scale']"))
    assert any(k.endswith("['scale']") for k in flat) and any("kernel" in k for k in flat)
