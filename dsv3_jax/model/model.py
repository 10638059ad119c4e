"""DeepSeekV3: embedding → dense blocks → MoE blocks (each a scanned stack) → norm → head, plus MTP.

`apply(variables, tokens_BT)` gives float32 logits; `return_aux=True` also gives the MTP logits and
the routers' statistics (expert counts, sequence-wise balance loss) that training needs. With `logits=False` the
outputs carry the head's inputs instead of logits, and the loss applies the head (`head_logits` on `head_weight`)
a chunk of positions at a time, so that no [B, T, V] float32 logits are held in training.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.model.block import block_stack
from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers.linear import make_linear
from dsv3_jax.model.layers.norm import RMSNorm
from dsv3_jax.model.layers.rope import rope_tables
from dsv3_jax.model.moe.router import RouterStats
from dsv3_jax.model.mtp import MTPModule, shift_tokens
from dsv3_jax.model.segments import same_segment


class ModelOutputs(NamedTuple):
    logits_BTV: jnp.ndarray | None
    mtp_logits_ZBTV: jnp.ndarray | None   # depth d predicts token i + d + 2 at position i
    moe_stats: RouterStats | None         # leading axis: MoE layers
    mtp_stats: RouterStats | None         # leading axis: MTP modules
    head_in_BTD: jnp.ndarray | None = None       # with logits=False: what the head maps to logits_BTV
    mtp_head_in_ZBTD: jnp.ndarray | None = None  # ... and to mtp_logits_ZBTV


def embedding(c: ModelConfig) -> nn.Embed:
    """The token embedding (shared with the MTP modules, and with the head when tied)."""
    return nn.Embed(c.vocab_size, c.dim, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range),
                                                                ("vocab", "embed")), name="embed")


def output_head(c: ModelConfig, embed: nn.Embed):
    """hidden -> float32 logits: the embedding's transpose when tied, else its own `lm_head` (never FP8)."""
    if c.tie_word_embeddings:
        return lambda x: embed.attend(x).astype(jnp.float32)
    return make_linear(c, c.vocab_size, ("embed", "vocab"), "lm_head", out_dtype=jnp.float32, allow_fp8=False)


def head_weight(c: ModelConfig, params: dict):
    """The head's [D, V] matrix in the parameter tree (the embedding's transpose when tied)."""
    return params["embed"]["embedding"].T if c.tie_word_embeddings else params["lm_head"]["kernel"]


def head_logits(c: ModelConfig, w_DV, x_BTD):
    """float32 logits from the head's matrix, computed as `output_head` computes them (same dtypes and rounding)."""
    x, w = x_BTD.astype(c.jnp_dtype), w_DV.astype(c.jnp_dtype)
    if c.tie_word_embeddings:
        logits_BTV = jnp.dot(x, w).astype(jnp.float32)
    else:
        logits_BTV = jnp.dot(x, w, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))


def final_norm(c: ModelConfig) -> RMSNorm:
    return RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="final_norm")


def mtp_outputs(c: ModelConfig, embed, head, x_BTD, tokens_BT, rope_cos_sin, segment_ids_BT):
    """The MTP modules chained on the main model's last hidden state: (logits [D, B, T, V], RouterStats with a
    leading D axis), or (None, None) without MTP; with `head` None, the head's inputs [D, B, T, dim] in place of the
    logits. Call inside a compact method: it creates the `mtp_{d}` modules."""
    mtp_out, mtp_stats = [], []
    h_BTD = x_BTD
    for depth in range(c.num_mtp_modules):
        next_emb_BTD = embed(shift_tokens(tokens_BT, depth + 1))
        # The router counts a position only where the token it embeds is in its own document: not padding, not
        # the next document, not the filler past the row's end.
        counted_BT = same_segment(segment_ids_BT, depth + 1, tokens_BT.shape)
        h_BTD, normed_BTD, stats = MTPModule(c, name=f"mtp_{depth}")(h_BTD, next_emb_BTD, rope_cos_sin,
                                                                     segment_ids_BT, counted_BT)
        mtp_out.append(normed_BTD if head is None else head(normed_BTD))
        mtp_stats.append(stats)
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs) if xs else None
    return stack(mtp_out), stack(mtp_stats)


class DeepSeekV3(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, return_aux: bool = False,
                 logits: bool = True):
        c = self.config
        logits = logits or self.is_initializing()   # init creates the head's parameters
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        embed = embedding(c)
        head = output_head(c, embed)

        rope = rope_tables(positions_BT, c)
        x_BTD = embed(tokens_BT)
        moe_stats = None
        if c.first_k_dense_replace > 0:
            x_BTD, _ = block_stack(c, False, c.first_k_dense_replace, "dense_layers")(x_BTD, rope, segment_ids_BT)
        if c.n_moe_layers > 0:
            x_BTD, moe_stats = block_stack(c, True, c.n_moe_layers, "moe_layers")(x_BTD, rope, segment_ids_BT)
        normed_BTD = final_norm(c)(x_BTD)
        logits_BTV = nn.with_logical_constraint(head(normed_BTD), ("batch", "length", "vocab")) if logits else None
        if not (return_aux or self.is_initializing()):
            return logits_BTV

        mtp_out, mtp_stats = mtp_outputs(c, embed, head if logits else None, x_BTD, tokens_BT, rope, segment_ids_BT)
        if logits:
            outputs = ModelOutputs(logits_BTV, mtp_out, moe_stats, mtp_stats)
        else:
            outputs = ModelOutputs(None, None, moe_stats, mtp_stats, normed_BTD, mtp_out)
        return outputs if return_aux else logits_BTV


def init_variables(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Plain-array variables ({'params', 'moe_bias'}) of a freshly initialised model."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return nn.meta.unbox(DeepSeekV3(config.validate()).init(rng, tokens))


def logical_axes(config: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a PartitionSpec tree shaped like the variables."""
    boxed = jax.eval_shape(lambda: DeepSeekV3(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return nn.get_partition_spec(boxed)
