"""DeepSeekMoE routing against an independent NumPy oracle of the reference pseudo-code.

The oracle loops over tokens, picks groups and experts with stable sorts (ties go to the lower
index, as jax.lax.top_k does) and never uses -inf: it simply restricts the candidates to the kept
groups, which is what the official -inf masking means.
"""

from __future__ import annotations

import itertools
import zlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.moe import router
from dsv3_jax.model.moe.router import Routing

# Jitted once per (config, shape): op-by-op dispatch is several times slower on a CPU.
route = jax.jit(router.route, static_argnums=2)
router_stats = jax.jit(router.router_stats, static_argnums=(1, 2))


# ---- the oracle ----------------------------------------------------------------------------------
def np_scores(logits, scoring_func):
    x = logits.astype(np.float64)
    if scoring_func == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_indices(values, k):
    """Indices of the k largest values, largest first, ties toward the lower index."""
    return list(np.argsort(-np.asarray(values), kind="stable")[:k])


def kept_groups(sel_row, c):
    """The groups a token may use (all of them for greedy or a single group)."""
    if c.topk_method == "greedy" or c.n_group == 1:
        return list(range(c.n_group))
    size = len(sel_row) // c.n_group
    group_scores = []
    for g in range(c.n_group):
        members = sorted(sel_row[g * size:(g + 1) * size], reverse=True)
        group_scores.append(members[0] + members[1] if c.topk_method == "noaux_tc" else members[0])
    return top_indices(np.asarray(group_scores, dtype=sel_row.dtype), c.topk_group)


def oracle_route(scores, bias, c, mask_value=None):
    """(weights, experts) per the reference pseudo-code.

    mask_value=None restricts candidates to the kept groups (the official -inf semantics);
    mask_value=0.0 reproduces HF's old behaviour of setting dropped groups' scores to 0.
    """
    T, E = scores.shape
    size = E // c.n_group
    sel = (scores + bias[None, :]).astype(scores.dtype)
    experts = np.zeros((T, c.num_experts_per_tok), np.int64)
    weights = np.zeros((T, c.num_experts_per_tok), np.float64)
    for t in range(T):
        groups = kept_groups(sel[t], c)
        in_kept = np.array([e // size in groups for e in range(E)])
        if mask_value is None:
            candidates = [e for e in range(E) if in_kept[e]]
            chosen = [candidates[i] for i in top_indices(sel[t, candidates], c.num_experts_per_tok)]
        else:
            masked = np.where(in_kept, sel[t], np.asarray(mask_value, sel.dtype))
            chosen = top_indices(masked, c.num_experts_per_tok)
        w = scores[t, chosen].astype(np.float64)
        if c.norm_topk_prob:
            w = w / w.sum()
        experts[t] = chosen
        weights[t] = w * c.routed_scaling_factor
    return weights, experts


def make_config(**kw) -> ModelConfig:
    base = dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="noaux_tc",
                scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    base.update(kw)
    return ModelConfig(**base).validate()


def check_against_oracle(logits, bias, c, atol=1e-6):
    r = route(jnp.asarray(logits), jnp.asarray(bias), c)
    scores = np.asarray(r.scores_TE)
    # The score function, checked against float64 NumPy...
    np.testing.assert_allclose(scores, np_scores(logits, c.scoring_func), rtol=2e-6, atol=1e-7)
    # ...and the selection logic fed the very same float32 scores, so it must agree exactly.
    weights, experts = oracle_route(scores, bias.astype(np.float32), c)
    np.testing.assert_array_equal(np.asarray(r.experts_TK), experts)
    np.testing.assert_allclose(np.asarray(r.weights_TK), weights, rtol=2e-6, atol=atol)
    assert r.weights_TK.dtype == jnp.float32 and r.experts_TK.dtype == jnp.int32
    return r


# ---- route vs oracle -----------------------------------------------------------------------------
CASES = [
    # (scoring, method, n_group, topk_group, norm, scale)
    *[(s, m, g, kg, n, f)
      for s, m in itertools.product(("sigmoid", "softmax"), ("noaux_tc", "group_limited_greedy", "greedy"))
      for g, kg in ((1, 1), (4, 2))
      for n, f in ((True, 2.5), (False, 16.0))],
    ("sigmoid", "noaux_tc", 8, 4, True, 1.0),
    ("softmax", "group_limited_greedy", 8, 3, False, 1.0),
    ("sigmoid", "noaux_tc", 2, 1, True, 2.5),
]


@pytest.mark.parametrize("scoring,method,n_group,topk_group,norm,scale", CASES)
def test_route_matches_oracle(scoring, method, n_group, topk_group, norm, scale):
    E = 32 if n_group == 8 else 16
    c = make_config(n_routed_experts=E, n_group=n_group, topk_group=topk_group, topk_method=method,
                    scoring_func=scoring, norm_topk_prob=norm, routed_scaling_factor=scale,
                    num_experts_per_tok=3 if topk_group == 1 else 4)
    rng = np.random.default_rng(zlib.crc32(f"{scoring}{method}{n_group}{topk_group}{norm}".encode()))
    logits = rng.normal(size=(48, E)).astype(np.float32) * 2
    bias = (rng.normal(size=E) * 0.3).astype(np.float32)
    r = check_against_oracle(logits, bias, c)
    if norm:
        np.testing.assert_allclose(np.asarray(r.weights_TK).sum(-1), scale, rtol=1e-5)


def test_bias_affects_selection_but_not_weights():
    """The correction bias changes which experts are picked; the weights still come from unbiased scores."""
    c = make_config(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(32, 16)).astype(np.float32)
    bias = np.zeros(16, np.float32)
    bias[[3, 7]] = 10.0   # forces experts 3 and 7 into every token's top-k
    r = check_against_oracle(logits, bias, c)
    experts = np.asarray(r.experts_TK)
    assert all({3, 7} <= set(row) for row in experts)
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(r.weights_TK), np.take_along_axis(scores, experts, 1), rtol=1e-5)
    assert np.asarray(r.weights_TK).max() < 1.0   # no bias leaked into a weight


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
def test_negative_biased_scores_never_pick_dropped_groups(method):
    """All biased scores negative: HF's old 0.0 masking would pick experts from dropped groups; -inf must not."""
    c = make_config(n_routed_experts=32, n_group=8, topk_group=2, num_experts_per_tok=6, topk_method=method)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 32)).astype(np.float32)
    bias = (-5.0 - rng.uniform(size=32)).astype(np.float32)
    r = check_against_oracle(logits, bias, c)
    scores = np.asarray(r.scores_TE)
    sel = scores + bias
    assert (sel < 0).all()
    experts = np.asarray(r.experts_TK)
    for t in range(64):
        groups = set(kept_groups(sel[t], c))
        assert {e // 4 for e in experts[t]} <= groups, (t, experts[t], groups)
    # The case really separates the two semantics: 0.0 masking picks dropped-group experts.
    _, hf_experts = oracle_route(scores, bias, c, mask_value=0.0)
    assert (hf_experts != experts).any()
    assert any(not {e // 4 for e in hf_experts[t]} <= set(kept_groups(sel[t], c)) for t in range(64))


@pytest.mark.parametrize("method,n_group", [("noaux_tc", 4), ("group_limited_greedy", 4), ("greedy", 1)])
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_exact_ties_break_toward_lower_index(method, n_group, scoring):
    c = make_config(n_group=n_group, topk_group=2 if n_group > 1 else 1, topk_method=method, scoring_func=scoring)
    rng = np.random.default_rng(2)
    logits = rng.integers(0, 3, size=(64, 16)).astype(np.float32)   # heavy duplication
    logits[0] = 1.0                                                   # one fully tied row
    bias = np.zeros(16, np.float32)
    r = check_against_oracle(logits, bias, c)
    # A fully tied row picks the lowest indices (within the lowest-index groups).
    np.testing.assert_array_equal(np.asarray(r.experts_TK)[0], [0, 1, 2, 3])


def test_tied_group_scores_pick_lower_group():
    c = make_config(n_group=4, topk_group=1, num_experts_per_tok=2)
    logits = np.zeros((1, 16), np.float32)
    logits[0, [5, 6, 13, 14]] = 3.0      # groups 1 and 3 tie on their top-2 sum
    r = check_against_oracle(logits, np.zeros(16, np.float32), c)
    np.testing.assert_array_equal(np.asarray(r.experts_TK)[0], [5, 6])


def test_noaux_tc_uses_top2_sum_not_max():
    """Group 0 has the single best expert, group 1 the best pair: noaux_tc and max disagree."""
    logits = np.full((1, 8), -4.0, np.float32)
    logits[0, 0] = 4.0                 # group 0: 4.0, -4, -4, -4
    logits[0, [4, 5]] = 2.0            # group 1: 2.0, 2.0, -4, -4
    bias = np.zeros(8, np.float32)
    tc = make_config(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, topk_method="noaux_tc")
    mx = tc.replace(topk_method="group_limited_greedy")
    assert sorted(np.asarray(check_against_oracle(logits, bias, tc).experts_TK)[0]) == [4, 5]
    assert sorted(np.asarray(check_against_oracle(logits, bias, mx).experts_TK)[0]) == [0, 1]


# ---- properties ----------------------------------------------------------------------------------
@st.composite
def routing_problems(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(2, 4))
    E = n_group * per_group
    topk_group = draw(st.integers(1, n_group))
    method = draw(st.sampled_from(["noaux_tc", "group_limited_greedy", "greedy"]))
    kept = E if (method == "greedy" or n_group == 1) else topk_group * per_group
    c = make_config(n_routed_experts=E, n_group=n_group, topk_group=topk_group, topk_method=method,
                    num_experts_per_tok=draw(st.integers(1, kept)),
                    scoring_func=draw(st.sampled_from(["sigmoid", "softmax"])),
                    norm_topk_prob=draw(st.booleans()),
                    routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])))
    T = 6
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        logits = rng.integers(-2, 3, size=(T, E)).astype(np.float32)          # many exact ties
    else:
        logits = (rng.normal(size=(T, E)) * 3).astype(np.float32)
    bias = (rng.normal(size=E) * draw(st.sampled_from([0.0, 0.1, 3.0])) - draw(st.sampled_from([0.0, 10.0])))
    return c, logits, bias.astype(np.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing_problems())
def test_route_properties(problem):
    c, logits, bias = problem
    r = route(jnp.asarray(logits), jnp.asarray(bias), c)
    experts, weights, scores = np.asarray(r.experts_TK), np.asarray(r.weights_TK), np.asarray(r.scores_TE)
    E, K = c.n_routed_experts, c.num_experts_per_tok
    size = E // c.n_group
    sel = scores + bias
    assert experts.shape == (logits.shape[0], K)
    assert ((experts >= 0) & (experts < E)).all()
    for t in range(len(experts)):
        assert len(set(experts[t])) == K, experts[t]
        if c.topk_method != "greedy" and c.n_group > 1:
            groups = sel[t].reshape(c.n_group, size)
            gs = np.sort(groups, axis=1)[:, ::-1]
            gscore = gs[:, :2].sum(1) if c.topk_method == "noaux_tc" else gs[:, 0]
            threshold = np.sort(gscore)[::-1][c.topk_group - 1]
            used = {e // size for e in experts[t]}
            assert len(used) <= c.topk_group
            assert all(gscore[g] >= threshold for g in used), (used, gscore)
        # Chosen experts beat every unchosen expert of the groups used (on biased scores).
        if c.topk_method == "greedy" or c.n_group == 1:
            others = [e for e in range(E) if e not in experts[t]]
            if others:
                assert sel[t, experts[t]].min() >= sel[t, others].max()
    assert (weights >= 0).all()
    if c.norm_topk_prob:
        np.testing.assert_allclose(weights.sum(-1), c.routed_scaling_factor, rtol=1e-5)
    else:
        np.testing.assert_allclose(weights, np.take_along_axis(scores, experts, 1) * c.routed_scaling_factor,
                                   rtol=1e-6)
    # Full agreement with the oracle on the same float32 scores.
    ow, oe = oracle_route(scores, bias, c)
    np.testing.assert_array_equal(experts, oe)
    np.testing.assert_allclose(weights, ow, rtol=2e-6, atol=1e-7)


# ---- router_stats --------------------------------------------------------------------------------
def np_balance_loss(experts, scores, batch, E):
    T_all, K = experts.shape
    T = T_all // batch
    losses = []
    for b in range(batch):
        ex, s = experts[b * T:(b + 1) * T], scores[b * T:(b + 1) * T].astype(np.float64)
        f = np.array([E / (K * T) * sum(i in ex[t] for t in range(T)) for i in range(E)])
        P = (s / s.sum(-1, keepdims=True)).mean(0)
        losses.append((f * P).sum())
    return float(np.mean(losses))


@pytest.mark.parametrize("scoring,batch", [("sigmoid", 1), ("sigmoid", 3), ("softmax", 2)])
def test_router_stats_counts_and_balance_loss(scoring, batch):
    c = make_config(scoring_func=scoring)
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(batch * 20, 16)) * 2).astype(np.float32)
    logits[:, :3] += 2.0   # skewed load
    r = route(jnp.asarray(logits), jnp.zeros(16), c)
    stats = router_stats(r, batch, 16)
    experts, scores = np.asarray(r.experts_TK), np.asarray(r.scores_TE)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts_E), np.bincount(experts.ravel(), minlength=16))
    assert float(np.asarray(stats.expert_counts_E).sum()) == batch * 20 * c.num_experts_per_tok
    np.testing.assert_allclose(float(stats.balance_loss), np_balance_loss(experts, scores, batch, 16), rtol=1e-5)
    assert float(stats.balance_loss) > 1.0   # skewed routing costs more than balanced


def test_balance_loss_is_mean_over_sequences_not_pooled():
    """Two sequences, each collapsed onto a different expert: per-sequence loss is high, pooled would be lower."""
    E, K, T = 4, 1, 4
    experts = np.array([[0]] * T + [[1]] * T, np.int32)
    scores = np.full((2 * T, E), 0.1, np.float32)
    scores[:T, 0] = 0.7
    scores[T:, 1] = 0.7
    stats = router_stats(Routing(jnp.ones((2 * T, K)), jnp.asarray(experts), jnp.asarray(scores)), 2, E)
    # Each sequence: f_0 = E, P_0 = 0.7 → L = 4 · 0.7 = 2.8.
    np.testing.assert_allclose(float(stats.balance_loss), 2.8, rtol=1e-6)
    np.testing.assert_allclose(float(stats.balance_loss), np_balance_loss(experts, scores, 2, E), rtol=1e-6)


@pytest.mark.parametrize("uniform_scores", [True, False])
def test_balance_loss_is_one_when_perfectly_balanced(uniform_scores):
    """Every expert gets exactly K·T/E tokens per sequence: f_i = 1, so L = Σ_i P_i = 1."""
    E, K, T, B = 8, 2, 12, 2
    experts = np.stack([[(2 * t) % E, (2 * t + 1) % E] for t in range(B * T)]).astype(np.int32)
    rng = np.random.default_rng(4)
    scores = np.full((B * T, E), 0.5, np.float32) if uniform_scores else \
        rng.uniform(0.05, 1.0, size=(B * T, E)).astype(np.float32)
    stats = router_stats(Routing(jnp.ones((B * T, K)), jnp.asarray(experts), jnp.asarray(scores)), B, E)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts_E), np.full(E, B * T * K // E))
    np.testing.assert_allclose(float(stats.balance_loss), 1.0, rtol=1e-6)


def test_balance_loss_collapsed_routing():
    """All tokens to expert 0 with score share p on it: f_0 = E, L = E · p."""
    E, T = 8, 10
    scores = np.full((T, E), 0.25, np.float32)
    scores[:, 0] = 1.0            # share 1.0 / (1.0 + 7 · 0.25) = 4/11
    stats = router_stats(Routing(jnp.ones((T, 1)), jnp.zeros((T, 1), jnp.int32), jnp.asarray(scores)), 1, E)
    np.testing.assert_allclose(float(stats.balance_loss), E * 4 / 11, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts_E), [T] + [0] * (E - 1))


def test_router_stats_leave_uncounted_tokens_out():
    """Rows of 10, 6 and 3 counted tokens (the rest padding): the counts are those of the counted tokens, and each
    row's balance loss is its counted prefix's, averaged over the rows."""
    B, T, E = 3, 10, 16
    c = make_config()
    rng = np.random.default_rng(5)
    r = route(jnp.asarray(rng.normal(size=(B * T, E)).astype(np.float32) * 2), jnp.zeros(E), c)
    lengths = np.array([10, 6, 3])
    counted = np.arange(T)[None, :] < lengths[:, None]
    stats = router_stats(r, B, E, jnp.asarray(counted))
    experts, scores = np.asarray(r.experts_TK).reshape(B, T, -1), np.asarray(r.scores_TE).reshape(B, T, E)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts_E), np.bincount(experts[counted].ravel(), minlength=E))
    per_row = [np_balance_loss(experts[b, :n], scores[b, :n], 1, E) for b, n in enumerate(lengths)]
    np.testing.assert_allclose(float(stats.balance_loss), np.mean(per_row), rtol=1e-5)
    everything = router_stats(r, B, E)
    assert float(np.asarray(everything.expert_counts_E).sum()) == B * T * c.num_experts_per_tok
    assert abs(float(everything.balance_loss) - float(stats.balance_loss)) > 1e-3
