"""MLA's attention core: the other cores (blockwise in plain JAX; splash in its CPU interpreter; jax.nn's
dot_product_attention with v padded; JAX's cuDNN call with v unpadded) compute the xla core's function, forward and
every input's gradient, with packed documents and the YaRN softmax scale. cuDNN runs only on a GPU, so here jax.nn's
own "xla" implementation stands in for it behind the same code path, and the private cuDNN function is replaced by a
float32 emulation of its documented semantics (bool mask -> bias, causal mask_type). `auto` resolves per platform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_compat
from dsv3_jax.config import ConfigError, YarnConfig
from dsv3_jax.model.layers import attention_core as core
from dsv3_jax.model.layers.flash_attention import flash_attention
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.config.presets import PRESETS
from tests.hf_oracle import random_variables

B, T, H, DN, DR, DV = 2, 12, 3, 16, 8, 16
YARN = YarnConfig(factor=40.0, original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=1.0)
SCALE = PRESETS["tiny"].replace(rope_scaling=YARN).softmax_scale
SEGMENTS = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [0] * 7 + [1] * 5], np.int32)


def inputs(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    shapes = [(B, T, H, DN), (B, T, H, DR), (B, T, H, DN), (B, T, DR), (B, T, H, DV)]
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


@pytest.fixture
def cudnn_through_xla(monkeypatch):
    monkeypatch.setitem(core.JAX_NN_IMPLEMENTATION, "cudnn", "xla")


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


@functools.partial(jax.jit, static_argnums=(0, 4))
def core_and_grads(impl, args, segment_ids, cotangent, interpret=False):
    out, vjp = jax.vjp(lambda *xs: core.attention_core(impl, *xs, SCALE, segment_ids, interpret=interpret), *args)
    return out, vjp(cotangent)


def assert_core_equals_xla(run, packed, seed=0):
    """run(args, segment_ids, cotangent) -> (out, grads) equals the xla core's, output and every input's gradient."""
    args = inputs(seed)
    segment_ids = jnp.asarray(SEGMENTS) if packed else None
    cotangent = jax.random.normal(jax.random.PRNGKey(9), (B, T, H, DV))
    want, want_grads = core_and_grads("xla", args, segment_ids, cotangent)
    got, got_grads = run(args, segment_ids, cotangent)
    assert got.shape == (B, T, H, DV)
    close(got, want)
    assert len(got_grads) == len(want_grads) == 5
    for g, w in zip(got_grads, want_grads):
        close(g, w)


@pytest.mark.parametrize("block", [4, 5, 512], ids=["blocks_of_4", "blocks_of_5_padded", "one_block"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_blockwise_core_equals_xla_core(packed, block):
    @jax.jit
    def run(args, segment_ids, cotangent):
        out, vjp = jax.vjp(lambda *xs: flash_attention(*xs, SCALE, segment_ids, block=block), *args)
        return out, vjp(cotangent)

    assert_core_equals_xla(run, packed)


def test_blockwise_through_attention_core_equals_xla():
    assert_core_equals_xla(lambda *a: core_and_grads("blockwise", *a), packed=True, seed=3)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_splash_core_in_its_interpreter_equals_xla_core(packed):
    """The Pallas TPU splash kernel, run by its CPU interpreter (T = 12 padded to its 128-row tile)."""
    assert_core_equals_xla(lambda *a: core_and_grads("splash", *a, True), packed, seed=4)


def test_attention_core_takes_a_resolved_impl():
    with pytest.raises(ValueError, match="auto"):
        core.attention_core("auto", *inputs(0), SCALE)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_padded_jax_nn_core_equals_xla_core(cudnn_through_xla, packed):
    assert_core_equals_xla(lambda *a: core_and_grads("cudnn", *a), packed)


def fake_cudnn(query, key, value, bias=None, mask=None, *, scale, mask_type, qkv_layout):
    """cuDNN's attention as JAX documents it, in float32: a bool mask becomes an additive large-negative bias."""
    assert qkv_layout == "BTNH" and bias is None and mask_type == jax_compat.cudnn_fused_attention().MaskType.CAUSAL
    assert value.shape[-1] == DV and key.shape[-1] == DN + DR   # MLA: v keeps its own head dim
    logits = jnp.einsum("bthk,bshk->bhts", query, key) * scale
    n = query.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -1e30)
    if mask is not None:
        logits = logits + jnp.where(mask, 0.0, -1e30)
    return jnp.einsum("bhts,bshv->bthv", jax.nn.softmax(logits, axis=-1), value)


def test_cudnn_mla_call_passes_unpadded_v_scale_and_segments(monkeypatch):
    monkeypatch.setattr(jax_compat.cudnn_fused_attention(), "dot_product_attention", fake_cudnn)
    args = inputs(1)
    segment_ids = jnp.asarray(SEGMENTS)
    run = jax.jit(lambda impl, *xs: core.attention_core(impl, *xs, SCALE, segment_ids), static_argnums=0)
    close(run("cudnn_mla", *args), run("xla", *args))


@pytest.mark.parametrize("impl", ["cudnn", "blockwise"])
def test_model_through_the_call_site_equals_xla(cudnn_through_xla, impl):
    """The whole model (MLA's call site, YaRN, packed documents, positions restarting per document)."""
    config = PRESETS["tiny"].replace(n_layers=2, num_mtp_modules=0, rope_scaling=YARN)
    variables = random_variables(config, seed=0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, config.vocab_size)
    segment_ids = jnp.asarray(SEGMENTS)
    starts = jnp.asarray([[0] * 5 + [5] * 3 + [8] * 4, [0] * 7 + [7] * 5])
    positions = jnp.arange(T)[None] - starts
    # The cuDNN config is not validated here: it would (rightly) refuse float32 on any real cuDNN.
    logits = [jax.jit(DeepSeekV3(config.replace(attention_impl=name)).apply)(variables, tokens, positions,
                                                                             segment_ids)
              for name in ("xla", impl)]
    close(logits[1], logits[0])


def test_attention_impl_is_validated_with_one_line_errors():
    small = PRESETS["small"]
    assert small.replace(attention_impl="cudnn").validate().attention_impl == "cudnn"   # bf16, head dims 96 / 64
    small.replace(attention_impl="cudnn_mla").validate()
    for impl in ("auto", "xla", "blockwise", "splash"):   # any dtype
        small.replace(attention_impl=impl, dtype="float32").validate()
    bad = [dict(attention_impl="flash"), dict(attention_impl="cudnn", dtype="float32"),
           dict(attention_impl="cudnn", qk_nope_head_dim=300), dict(attention_impl="cudnn_mla", v_head_dim=60),
           dict(attention_impl="cudnn", v_head_dim=128)]
    for changes in bad:
        with pytest.raises(ConfigError, match=r"^model\.attention_impl\b[^\n]*$"):
            small.replace(**changes).validate()
    assert small.with_overrides("attention_impl=cudnn").attention_impl == "cudnn"
