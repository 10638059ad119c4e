"""One decoder block (RMSNorm → MLA → residual, RMSNorm → MLP or MoE → residual) and its scanned stack; decoding runs
the same blocks over MLA's latent cache."""

from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model.layers.mla import MLA, LayerCache
from dsv3_jax.model.layers.mlp import MLP
from dsv3_jax.model.layers.norm import RMSNorm
from dsv3_jax.model.moe.layer import MoE
from dsv3_jax.model.moe.router import BIAS_COLLECTION
from dsv3_jax.model.segments import same_segment

ACTIVATION_AXES = ("batch", "length", "embed")


class DecoderBlock(nn.Module):
    config: ModelConfig
    kernels: KernelSet
    use_moe: bool
    absorbed: bool = True   # MLA's form over a cache

    @nn.compact
    def __call__(self, x_BTD, rope_cos_sin, segment_ids_BT=None, positions_BT=None, cache: LayerCache | None = None,
                 counted_BT=None):
        """(x_BTD, (router stats | None, cache | None)). `counted_BT`: the tokens the MoE router's statistics count;
        default the non-padding ones. With a `cache` (decoding) the new tokens at `positions_BT` attend over MLA's
        latent cache and the updated cache comes back."""
        c, ks = self.config, self.kernels
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        attn_in = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="attn_norm")(x_BTD)
        attn_out = MLA(c, ks, self.absorbed, name="attn")(attn_in, rope_cos_sin, segment_ids_BT, positions_BT, cache)
        if cache is not None:
            attn_out, cache = attn_out
        h_BTD = x_BTD + attn_out
        mlp_in = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="mlp_norm")(h_BTD)
        if self.use_moe:
            if counted_BT is None and segment_ids_BT is not None:
                counted_BT = same_segment(segment_ids_BT, 0, segment_ids_BT.shape)
            y_BTD, stats = MoE(c, ks, name="moe")(mlp_in, counted_BT)
        else:
            y_BTD, stats = MLP(c, ks, c.intermediate_size, name="mlp")(mlp_in), None
        out_BTD = nn.with_logical_constraint(h_BTD + y_BTD, ACTIVATION_AXES)
        return out_BTD, (stats, cache)


def remat_policy(name: str):
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "save_attn_out": policies.save_only_these_names("attn_out"),
    }[name]


def block_stack(config: ModelConfig, kernels: KernelSet, use_moe: bool, length: int, name: str | None = None,
                absorbed: bool = True) -> nn.Module:
    """`length` blocks with parameters stacked on a leading `layers` axis, run by nn.scan (fully unrolled with
    `scan_layers=False`), called as stack(x_BTD, rope_cos_sin, segment_ids_BT, positions_BT, cache) -> (x_BTD,
    (stats, cache)): stats and cache (a LayerCache of the stack, or None) carry the leading layer axis."""
    block = DecoderBlock
    if config.remat_policy != "none":
        block = nn.remat(block, policy=remat_policy(config.remat_policy), prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, BIAS_COLLECTION: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=length,
        unroll=1 if config.scan_layers else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, kernels, use_moe, absorbed, name=name)
