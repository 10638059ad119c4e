"""One decoder block (RMSNorm → MLA → residual, RMSNorm → MLP or MoE → residual) and its scanned stack; decoding
(dsv3_jax.infer) runs the same block over a latent cache."""

from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers.mla import CacheStep, MLA
from dsv3_jax.model.layers.mlp import MLP
from dsv3_jax.model.layers.norm import RMSNorm
from dsv3_jax.model.moe.layer import MoE
from dsv3_jax.model.moe.router import BIAS_COLLECTION
from dsv3_jax.model.segments import same_segment

ACTIVATION_AXES = ("batch", "length", "embed")


class DecoderBlock(nn.Module):
    config: ModelConfig
    use_moe: bool

    @nn.compact
    def __call__(self, x_BTD, rope_cos_sin, segment_ids_BT, counted_BT=None, cache: CacheStep | None = None):
        """(x_BTD, router stats | None). `counted_BT`: the tokens the MoE router's statistics count; default the
        non-padding ones. With a `cache` (decoding: the new tokens attend over MLA's latent cache) it returns
        (x_BTD, stats, the updated cache)."""
        c = self.config
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        attn_in = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="attn_norm")(x_BTD)
        attn_out = MLA(c, name="attn")(attn_in, rope_cos_sin, segment_ids_BT, cache)
        if cache is not None:
            attn_out, cache = attn_out
        h_BTD = x_BTD + attn_out
        mlp_in = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="mlp_norm")(h_BTD)
        if self.use_moe:
            if counted_BT is None and segment_ids_BT is not None:
                counted_BT = same_segment(segment_ids_BT, 0, segment_ids_BT.shape)
            y_BTD, stats = MoE(c, name="moe")(mlp_in, counted_BT)
        else:
            y_BTD, stats = MLP(c, c.intermediate_size, name="mlp")(mlp_in), None
        out_BTD = nn.with_logical_constraint(h_BTD + y_BTD, ACTIVATION_AXES)
        return (out_BTD, stats) if cache is None else (out_BTD, stats, cache)


def remat_policy(name: str):
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "save_attn_out": policies.save_only_these_names("attn_out"),
    }[name]


def block_stack(config: ModelConfig, use_moe: bool, length: int, name: str) -> nn.Module:
    """`length` blocks with parameters stacked on a leading `layers` axis, run by nn.scan.

    With `scan_layers=False` the scan is fully unrolled: the same parameters, compiled per layer.
    """
    block = DecoderBlock
    if config.remat_policy != "none":
        block = nn.remat(block, policy=remat_policy(config.remat_policy), prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, BIAS_COLLECTION: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        unroll=1 if config.scan_layers else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, use_moe, name=name)
