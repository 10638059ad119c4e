"""DeepSeekV3: embedding → dense blocks → MoE blocks (each a scanned stack) → norm → head, plus MTP; its `decode` and
`draft` methods run the same modules over MLA's latent cache (dsv3_jax.infer)."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import kernels as kernel_registry
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model.block import block_stack
from dsv3_jax.model.layers.linear import make_linear
from dsv3_jax.model.layers.mla import LatentCache, LayerCache
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


def embedding(c: ModelConfig, name: str | None = "embed") -> nn.Embed:
    """The token embedding (shared with the MTP modules, and with the head when tied)."""
    return nn.Embed(c.vocab_size, c.dim, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range),
                                                                ("vocab", "embed")), name=name)


def output_head(c: ModelConfig, kernels: KernelSet, embed: nn.Embed, name: str | None = "lm_head"):
    """hidden -> float32 logits: the embedding's transpose when tied, else its own `lm_head` (never FP8)."""
    if c.tie_word_embeddings:
        return lambda x: embed.attend(x).astype(jnp.float32)
    return make_linear(c, kernels, c.vocab_size, ("embed", "vocab"), name, out_dtype=jnp.float32, allow_fp8=False)


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


def final_norm(c: ModelConfig, name: str | None = "final_norm") -> RMSNorm:
    return RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name=name)


def mtp_outputs(modules, embed, head, x_BTD, tokens_BT, rope_cos_sin, segment_ids_BT):
    """The MTP `modules` chained on the main model's last hidden state: (logits [Z, B, T, V], RouterStats with a
    leading Z axis), or (None, None) without MTP; with `head` None, the head's inputs [Z, B, T, D] in place of the
    logits."""
    mtp_out, mtp_stats = [], []
    h_BTD = x_BTD
    for depth, module in enumerate(modules):
        next_emb_BTD = embed(shift_tokens(tokens_BT, depth + 1))
        # The router counts a position only where the token it embeds is in its own document: not padding, not
        # the next document, not the filler past the row's end.
        counted_BT = same_segment(segment_ids_BT, depth + 1, tokens_BT.shape)
        h_BTD, normed_BTD, stats, _ = module(h_BTD, next_emb_BTD, rope_cos_sin, segment_ids_BT, counted_BT)
        mtp_out.append(normed_BTD if head is None else head(normed_BTD))
        mtp_stats.append(stats)
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs) if xs else None
    return stack(mtp_out), stack(mtp_stats)


def run_stack(stack, x_BTD, rope_cos_sin, segment_ids_BT=None, positions_BT=None, cache: LatentCache | None = None):
    """A block_stack over x: (x_BTD, stats with a leading layer axis, the stack's updated cache or None)."""
    layers = None if cache is None else LayerCache(*cache)
    x_BTD, (stats, layers) = stack(x_BTD, rope_cos_sin, segment_ids_BT, positions_BT, layers)
    return x_BTD, stats, None if layers is None else LatentCache(*layers)


class DeepSeekV3(nn.Module):
    """`apply(variables, tokens_BT)` gives float32 logits; `return_aux=True` also the MTP logits and the routers'
    statistics; `logits=False` the head's inputs instead of logits (the loss applies the head in chunks).
    `kernels`: the resolved KernelSet every layer runs (dsv3_jax.kernels.resolve); None takes the default device's,
    resolved once when the model is constructed. `absorbed`: MLA's form in `decode` / `draft`."""
    config: ModelConfig
    kernels: KernelSet | None = None
    absorbed: bool = True

    def __post_init__(self):
        if self.kernels is None:
            object.__setattr__(self, "kernels", kernel_registry.resolve(self.config, jax.devices()[:1]))
        super().__post_init__()

    def setup(self):
        c, ks = self.config, self.kernels
        self.embed = embedding(c, name=None)
        if c.first_k_dense_replace > 0:
            self.dense_layers = block_stack(c, ks, False, c.first_k_dense_replace, absorbed=self.absorbed)
        if c.n_moe_layers > 0:
            self.moe_layers = block_stack(c, ks, True, c.n_moe_layers, absorbed=self.absorbed)
        self.final_norm = final_norm(c, name=None)
        self.lm_head = output_head(c, ks, self.embed, name=None)   # a function of the embedding when tied
        self.mtp = [MTPModule(c, ks, self.absorbed) for _ in range(c.num_mtp_modules)]   # mtp_0, mtp_1, ...

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, return_aux: bool = False,
                 logits: bool = True):
        c = self.config
        logits = logits or self.is_initializing()   # init creates the head's parameters
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        rope = rope_tables(positions_BT, c)
        x_BTD = self.embed(tokens_BT)
        moe_stats = None
        if c.first_k_dense_replace > 0:
            x_BTD, _, _ = run_stack(self.dense_layers, x_BTD, rope, segment_ids_BT)
        if c.n_moe_layers > 0:
            x_BTD, moe_stats, _ = run_stack(self.moe_layers, x_BTD, rope, segment_ids_BT)
        normed_BTD = self.final_norm(x_BTD)
        logits_BTV = nn.with_logical_constraint(self.lm_head(normed_BTD), ("batch", "length", "vocab")) if logits else None
        if not (return_aux or self.is_initializing()):
            return logits_BTV

        mtp_out, mtp_stats = mtp_outputs(self.mtp, self.embed, self.lm_head if logits else None, x_BTD, tokens_BT, rope,
                                         segment_ids_BT)
        if logits:
            outputs = ModelOutputs(logits_BTV, mtp_out, moe_stats, mtp_stats)
        else:
            outputs = ModelOutputs(None, None, moe_stats, mtp_stats, normed_BTD, mtp_out)
        return outputs if return_aux else logits_BTV

    def decode(self, tokens_BT, positions_BT, dense: LatentCache | None, moe: LatentCache | None):
        """The new tokens at `positions_BT` through the model over the dense and MoE stacks' latent caches:
        (logits_BTV float32, hidden_BTD before the final norm, dense, moe caches with the new latents written)."""
        rope = rope_tables(positions_BT, self.config)
        x_BTD = self.embed(tokens_BT)
        if dense is not None:
            x_BTD, _, dense = run_stack(self.dense_layers, x_BTD, rope, None, positions_BT, dense)
        if moe is not None:
            x_BTD, _, moe = run_stack(self.moe_layers, x_BTD, rope, None, positions_BT, moe)
        return self.lm_head(self.final_norm(x_BTD)), x_BTD, dense, moe

    def draft(self, hidden_BTD, next_tokens_BT, positions_BT, cache: LayerCache):
        """MTP module 0 at `positions_BT` over its latent cache: from a hidden state at position i and the token at
        i+1, the logits for the token at i+2: (logits_BTV, the module's hidden output_BTD, the updated cache)."""
        emb_BTD = self.embed(next_tokens_BT)
        h_BTD, normed_BTD, _, cache = self.mtp[0](hidden_BTD.astype(emb_BTD.dtype), emb_BTD,
                                                  rope_tables(positions_BT, self.config), None, None, positions_BT,
                                                  cache)
        return self.lm_head(normed_BTD), h_BTD, cache


def init_variables(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Plain-array variables ({'params', 'moe_bias'}) of a freshly initialised model (reference kernels: the
    parameters do not depend on the kernels)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return nn.meta.unbox(DeepSeekV3(config.validate(), kernel_registry.REFERENCE).init(rng, tokens))


def logical_axes(config: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a PartitionSpec tree shaped like the variables."""
    model = DeepSeekV3(config, kernel_registry.REFERENCE)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return nn.get_partition_spec(boxed)
