"""The full DeepSeekV3 network on the `tiny` preset: causality of the main and MTP heads, gradients of
every parameter, packed-document isolation, and the implementation switches (scan, remat, bf16).

Compilation dominates on a CPU, so the module compiles few functions and reuses them: one forward on
an (11, 10) batch, one packed forward, and one value-and-grad per (remat) config.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model import DeepSeekV3, ModelOutputs
from dsv3_jax.model.moe.router import BIAS_COLLECTION
from dsv3_jax.config.presets import PRESETS

TINY = PRESETS["tiny"]
assert TINY.dtype == "float32" and TINY.num_mtp_modules == 1
MTP2 = TINY.replace(num_mtp_modules=2)
T = 10


def random_variables(config, seed=0):
    """Variables shaped by the model's own init (via eval_shape), filled with visibly non-trivial values.

    Normal(0.02) weights (HF's default std, so every path carries signal), norm scales near 1, and a
    small random correction bias.
    """
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        DeepSeekV3(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.startswith(f"['{BIAS_COLLECTION}']"):
            value = rng.normal(size=leaf.shape) * 0.01
        elif name.endswith("['scale']"):
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        else:
            value = rng.normal(size=leaf.shape) * 0.02
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def drop_mtp(variables, keep: int):
    """The variables of the same model with only the first `keep` MTP modules."""
    return {col: {k: v for k, v in tree.items() if not (k.startswith("mtp_") and int(k[4:]) >= keep)}
            for col, tree in variables.items()}


@pytest.fixture(scope="module")
def vars_mtp2():
    return random_variables(MTP2)


@pytest.fixture(scope="module")
def vars_tiny(vars_mtp2):
    v = drop_mtp(vars_mtp2, 1)
    want = jax.eval_shape(lambda: nn.meta.unbox(DeepSeekV3(TINY).init(jax.random.PRNGKey(0),
                                                                     jnp.zeros((1, 4), jnp.int32))))
    assert jax.tree.structure(v) == jax.tree.structure(want)
    assert jax.tree.map(lambda a: a.shape, v) == jax.tree.map(lambda a: a.shape, want)
    return v


@pytest.fixture(scope="module")
def forward_mtp2():
    model = DeepSeekV3(MTP2)
    return jax.jit(lambda v, tokens: model.apply(v, tokens, return_aux=True))


@pytest.fixture(scope="module")
def base_tokens():
    return np.random.default_rng(1).integers(0, TINY.vocab_size, size=T).astype(np.int32)


@pytest.fixture(scope="module")
def perturbed_outputs(forward_mtp2, vars_mtp2, base_tokens):
    """Row 0: the base sequence; row p + 1: the base with token p replaced."""
    tokens = np.tile(base_tokens, (T + 1, 1))
    for p in range(T):
        tokens[p + 1, p] = (base_tokens[p] + 1 + 97 * p) % TINY.vocab_size
    out = forward_mtp2(vars_mtp2, jnp.asarray(tokens))
    return jax.tree.map(np.asarray, out)


# ---- (a) causality -------------------------------------------------------------------------------
def test_outputs_shapes(perturbed_outputs):
    out = perturbed_outputs
    assert isinstance(out, ModelOutputs)
    assert out.logits_BTV.shape == (T + 1, T, TINY.vocab_size) and out.logits_BTV.dtype == np.float32
    assert out.mtp_logits_ZBTV.shape == (2, T + 1, T, TINY.vocab_size)
    assert out.moe_stats.expert_counts_E.shape == (TINY.n_moe_layers, TINY.n_routed_experts)
    assert out.mtp_stats.balance_loss.shape == (2,)
    # Each MoE layer routes every (token, choice) pair: no dropping.
    np.testing.assert_array_equal(out.moe_stats.expert_counts_E.sum(-1), (T + 1) * T * TINY.num_experts_per_tok)
    assert np.isfinite(out.logits_BTV).all() and np.isfinite(out.mtp_logits_ZBTV).all()


@pytest.mark.parametrize("head", ["main", "mtp_0", "mtp_1"])
def test_causality(perturbed_outputs, head):
    """Main logits at i see tokens <= i; MTP depth d at i sees tokens <= i + d + 1 (it predicts i + d + 2)."""
    out = perturbed_outputs
    if head == "main":
        logits, reach = out.logits_BTV, 0
    else:
        d = int(head[-1])
        logits, reach = out.mtp_logits_ZBTV[d], d + 1
    for p in range(T):
        diff_T = np.abs(logits[p + 1] - logits[0]).max(-1)
        first_affected = max(p - reach, 0)
        # Positions that cannot see token p are unchanged...
        np.testing.assert_allclose(diff_T[:first_affected], 0.0, atol=1e-6, err_msg=f"{head}: token {p} leaked")
        # ...and every position that can see it changes (so the check above is not vacuous).
        assert (diff_T[first_affected:] > 1e-3).all(), (head, p, diff_T)


def test_batch_rows_are_independent(forward_mtp2, vars_mtp2, perturbed_outputs, base_tokens):
    """Dropless routing: a row's outputs do not depend on the other rows of the batch."""
    tokens = np.tile(base_tokens, (T + 1, 1))
    tokens[1:] = np.random.default_rng(5).integers(0, TINY.vocab_size, size=(T, T))
    out = forward_mtp2(vars_mtp2, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(out.logits_BTV[0]), perturbed_outputs.logits_BTV[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mtp_logits_ZBTV[:, 0]), perturbed_outputs.mtp_logits_ZBTV[:, 0],
                               atol=1e-5)


def test_correction_bias_changes_routing(forward_mtp2, vars_mtp2, base_tokens):
    """The moe_bias collection is live: a large bias on one expert sends every token to it."""
    bias = np.zeros(vars_mtp2[BIAS_COLLECTION]["moe_layers"]["moe"]["router"]["bias"].shape, np.float32)
    bias[:, 3] = 100.0
    v = {**vars_mtp2, BIAS_COLLECTION: {**vars_mtp2[BIAS_COLLECTION],
                                         "moe_layers": {"moe": {"router": {"bias": jnp.asarray(bias)}}}}}
    tokens = jnp.asarray(np.tile(base_tokens, (T + 1, 1)))
    out, ref = forward_mtp2(v, tokens), forward_mtp2(vars_mtp2, tokens)
    counts = np.asarray(out.moe_stats.expert_counts_E)
    np.testing.assert_array_equal(counts[:, 3], (T + 1) * T)   # both MoE layers, every token
    assert (np.asarray(ref.moe_stats.expert_counts_E)[:, 3] < (T + 1) * T).any()
    assert np.abs(np.asarray(out.logits_BTV) - np.asarray(ref.logits_BTV)).max() > 1e-3


# ---- (c) packed documents ------------------------------------------------------------------------
def test_segments_isolate_packed_documents(vars_mtp2, perturbed_outputs, base_tokens):
    """[doc A (5) ; doc B (10)] with segment ids and restarting positions: doc B's logits (main and MTP)
    equal doc B run alone (row 0 of the causality batch). Without segment ids they differ."""
    n_a = 5
    doc_a = np.random.default_rng(2).integers(0, TINY.vocab_size, size=n_a).astype(np.int32)
    tokens = np.tile(np.concatenate([doc_a, base_tokens]), (2, 1))
    positions = np.tile(np.concatenate([np.arange(n_a), np.arange(T)]), (2, 1)).astype(np.int32)
    segments = np.stack([np.concatenate([np.full(n_a, 1), np.full(T, 2)]),
                         np.ones(n_a + T)]).astype(np.int32)    # row 1: one segment → attention crosses
    model = DeepSeekV3(MTP2)
    out = jax.jit(lambda v, t, p, s: model.apply(v, t, p, s, return_aux=True))(
        vars_mtp2, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    alone = perturbed_outputs
    np.testing.assert_allclose(np.asarray(out.logits_BTV[0, n_a:]), alone.logits_BTV[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mtp_logits_ZBTV[:, 0, n_a:]), alone.mtp_logits_ZBTV[:, 0],
                               atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(out.logits_BTV[1, n_a:]) - alone.logits_BTV[0]).max() > 1e-3
    # Doc A is unaffected by what follows it either way (causality).
    np.testing.assert_allclose(np.asarray(out.logits_BTV[0, :n_a]), np.asarray(out.logits_BTV[1, :n_a]), atol=1e-6)


# ---- (b), (d), (e) gradients and implementation switches ----------------------------------------
GRAD_TOKENS = np.random.default_rng(3).integers(0, TINY.vocab_size, size=(2, 12)).astype(np.int32)


def cross_entropy(logits_BTV, targets_BT):
    logp = jax.nn.log_softmax(logits_BTV, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets_BT[..., None], axis=-1))


def lm_loss_fn(config):
    model = DeepSeekV3(config)

    def loss(variables, tokens):
        out = model.apply(variables, tokens, return_aux=True)
        total = cross_entropy(out.logits_BTV[:, :-1], tokens[:, 1:])
        for d in range(config.num_mtp_modules):   # depth d predicts token i + d + 2
            total += cross_entropy(out.mtp_logits_ZBTV[d][:, : -(d + 2)], tokens[:, d + 2:])
        return total, (out.logits_BTV, out.mtp_logits_ZBTV)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def tiny_grads(vars_tiny):
    return jax.tree.map(np.asarray, lm_loss_fn(TINY)(vars_tiny, jnp.asarray(GRAD_TOKENS)))


def test_every_parameter_gets_a_finite_nonzero_gradient(tiny_grads, vars_tiny):
    (loss, _), grads = tiny_grads
    assert np.isfinite(loss) and loss > 0
    assert set(vars_tiny) == {"params", BIAS_COLLECTION}
    assert not any(BIAS_COLLECTION in jax.tree_util.keystr(p) or "bias" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_leaves_with_path(vars_tiny["params"]))
    flat = jax.tree_util.tree_leaves_with_path(grads["params"])
    assert len(flat) == len(jax.tree.leaves(vars_tiny["params"]))
    for path, g in flat:
        name = jax.tree_util.keystr(path)
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 0, name
        if name.startswith(("['dense_layers']", "['moe_layers']")):   # stacked: every layer, not just one
            per_layer = np.abs(g.reshape(g.shape[0], -1)).max(-1)
            assert (per_layer > 0).all(), (name, per_layer)
    # The correction bias is selection-only: no gradient reaches it.
    for path, g in jax.tree_util.tree_leaves_with_path(grads[BIAS_COLLECTION]):
        assert not g.any(), jax.tree_util.keystr(path)


def test_unrolled_layers_match_scan(tiny_grads, vars_tiny):
    (_, (logits, mtp_logits)), _ = tiny_grads
    model = DeepSeekV3(TINY.replace(scan_layers=False))
    out = jax.jit(lambda v, t: model.apply(v, t, return_aux=True))(vars_tiny, jnp.asarray(GRAD_TOKENS))
    np.testing.assert_allclose(np.asarray(out.logits_BTV), logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mtp_logits_ZBTV), mtp_logits, atol=1e-5, rtol=1e-5)


def test_tiny_is_the_first_depth_of_mtp2(tiny_grads, vars_mtp2):
    """`tiny` (one MTP module) computes exactly the main and depth-0 outputs of the two-module config, so
    the causality checks on the latter cover the preset itself."""
    (_, (logits, mtp_logits)), _ = tiny_grads
    out = jax.jit(lambda v, t: DeepSeekV3(MTP2).apply(v, t, return_aux=True))(vars_mtp2, jnp.asarray(GRAD_TOKENS))
    assert mtp_logits.shape[0] == 1
    np.testing.assert_allclose(np.asarray(out.logits_BTV), logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mtp_logits_ZBTV[:1]), mtp_logits, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(out.mtp_logits_ZBTV[1]) - mtp_logits[0]).max() > 1e-3


def test_full_remat_matches(tiny_grads, vars_tiny):
    (loss, (logits, mtp_logits)), grads = tiny_grads
    (loss_r, (logits_r, mtp_r)), grads_r = lm_loss_fn(TINY.replace(remat_policy="full"))(
        vars_tiny, jnp.asarray(GRAD_TOKENS))
    np.testing.assert_allclose(float(loss_r), loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits_r), logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mtp_r), mtp_logits, atol=1e-5, rtol=1e-5)
    for (path, g), g_r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r)):
        scale = np.abs(g).max() + 1e-12
        np.testing.assert_allclose(np.asarray(g_r) / scale, g / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_bf16_compute(tiny_grads, vars_tiny):
    (_, (logits, mtp_logits)), _ = tiny_grads
    model = DeepSeekV3(TINY.replace(dtype="bfloat16"))
    out = jax.jit(lambda v, t: model.apply(v, t, return_aux=True))(vars_tiny, jnp.asarray(GRAD_TOKENS))
    for got, want in ((out.logits_BTV, logits), (out.mtp_logits_ZBTV, mtp_logits)):
        assert got.dtype == jnp.float32
        got = np.asarray(got)
        assert np.isfinite(got).all()
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 0.1, err
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    # It is really computed in bf16 (not silently float32).
    assert not np.allclose(np.asarray(out.logits_BTV), logits, atol=1e-5)
