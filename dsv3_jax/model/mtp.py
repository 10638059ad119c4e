"""Multi-Token Prediction module k: h' = W_proj [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)] → block. The embedding and
output head are the main model's; the module owns only its norms, projection, block and the norm before the head.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model.block import DecoderBlock
from dsv3_jax.model.layers.linear import make_linear
from dsv3_jax.model.layers.mla import LayerCache
from dsv3_jax.model.layers.norm import RMSNorm


def shift_tokens(tokens_BT, k: int, pad_id: int = 0):
    """tokens[:, i + k] at position i; the last k positions (no such token) hold `pad_id`."""
    return jnp.pad(tokens_BT[:, k:], ((0, 0), (0, k)), constant_values=pad_id)


class MTPModule(nn.Module):
    config: ModelConfig
    kernels: KernelSet
    absorbed: bool = True   # MLA's form over a cache (drafting)

    @nn.compact
    def __call__(self, h_prev_BTD, next_emb_BTD, rope_cos_sin, segment_ids_BT=None, counted_BT=None,
                 positions_BT=None, cache: LayerCache | None = None):
        """(h_BTD, the head's input, router stats, cache | None). `counted_BT`: the positions the block's router
        statistics count (DeepSeekV3 passes those whose embedded token lies in their own document). With a `cache`
        (drafting), the block attends over its latent cache at `positions_BT` and the updated cache comes back."""
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name=name)
        joined = jnp.concatenate([norm("enorm")(next_emb_BTD), norm("hnorm")(h_prev_BTD)], axis=-1)
        x_BTD = make_linear(c, self.kernels, c.dim, ("mtp_concat", "embed"), "eh_proj")(joined)
        h_BTD, (stats, cache) = DecoderBlock(c, self.kernels, use_moe=True, absorbed=self.absorbed, name="block")(
            x_BTD, rope_cos_sin, segment_ids_BT, positions_BT, cache, counted_BT)
        return h_BTD, norm("head_norm")(h_BTD), stats, cache
