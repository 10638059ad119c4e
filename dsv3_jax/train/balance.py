"""Auxiliary-loss-free load balancing: after each step, b_i += γ · sign(mean load − load_i) per router, applied outside
the optimizer to the `moe_bias` collection; the bias only changes which experts are selected, never the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.model import ModelOutputs


def bias_step(bias_E, counts_E, gamma):
    counts_E = counts_E.astype(jnp.float32)
    return bias_E + gamma * jnp.sign(counts_E.mean(axis=-1, keepdims=True) - counts_E)


def update_routing_bias(moe_bias: dict, outputs: ModelOutputs, gamma) -> dict:
    """New `moe_bias` collection from the step's expert counts (MoE stack and MTP modules)."""
    new = jax.tree.map(lambda x: x, moe_bias)
    if outputs.moe_stats is not None:
        router = new["moe_layers"]["moe"]["router"]
        router["bias"] = bias_step(router["bias"], outputs.moe_stats.expert_counts_E, gamma)
    if outputs.mtp_stats is not None:
        for d in range(outputs.mtp_stats.expert_counts_E.shape[0]):
            router = new[f"mtp_{d}"]["block"]["moe"]["router"]
            router["bias"] = bias_step(router["bias"], outputs.mtp_stats.expert_counts_E[d], gamma)
    return new
