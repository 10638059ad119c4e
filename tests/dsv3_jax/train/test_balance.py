"""Aux-loss-free balancing: the bias update moves a skewed router toward balance, and only selection."""

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import get_preset
from dsv3_jax.model.moe.router import route
from dsv3_jax.train.balance import bias_step

CONFIG = get_preset("tiny").replace(n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2)


def violation(counts_E):
    counts_E = np.asarray(counts_E, np.float64)
    return counts_E.max() / counts_E.mean() - 1


def test_bias_step_direction():
    bias = bias_step(jnp.zeros(4), jnp.array([8.0, 2.0, 5.0, 5.0]), 0.5)
    np.testing.assert_array_equal(np.asarray(bias), [-0.5, 0.5, 0.0, 0.0])


def test_skewed_router_is_driven_toward_balance():
    rng = np.random.default_rng(0)
    E = CONFIG.n_routed_experts
    skew_E = np.linspace(2.0, -2.0, E)     # expert 0 strongly preferred, expert 15 almost never chosen
    logits_TE = jnp.asarray(skew_E + 0.5 * rng.standard_normal((4096, E)), jnp.float32)

    @jax.jit
    def counts(bias_E):
        experts_TK = route(logits_TE, bias_E, CONFIG).experts_TK
        return jnp.bincount(experts_TK.reshape(-1), length=E)

    bias = jnp.zeros(E, jnp.float32)
    before = violation(counts(bias))
    for _ in range(300):
        bias = bias_step(bias, counts(bias), 0.01)
    after = violation(counts(bias))
    assert before > 2.0, before
    assert after < 0.25 * before and after < 0.5, (before, after)
    assert float(bias[0]) < 0 < float(bias[-1])     # the favourite is pushed down, the neglected one up


def test_bias_changes_selection_not_weights():
    rng = np.random.default_rng(1)
    logits_TE = jnp.asarray(rng.standard_normal((64, CONFIG.n_routed_experts)), jnp.float32)
    bias = jnp.asarray(rng.uniform(-1, 1, CONFIG.n_routed_experts), jnp.float32)
    biased = route(logits_TE, bias, CONFIG)
    assert not np.array_equal(np.asarray(biased.experts_TK), np.asarray(route(logits_TE, bias * 0, CONFIG).experts_TK))
    scores = np.asarray(jax.nn.sigmoid(logits_TE))
    picked = np.take_along_axis(scores, np.asarray(biased.experts_TK), axis=-1)
    expected = picked / picked.sum(-1, keepdims=True) * CONFIG.routed_scaling_factor
    np.testing.assert_allclose(np.asarray(biased.weights_TK), expected, rtol=1e-6)
