"""The DeepSeekMoE layer: route, dispatch, grouped SwiGLU experts, weighted combine, plus shared experts. Dropless:
every (token, choice) pair is computed; the grouped matmul takes ragged groups.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model import fp8_weights
from dsv3_jax.model.layers.mlp import MLP
from dsv3_jax.model.moe.backend import MoEKernels
from dsv3_jax.model.moe.experts import swiglu_experts
from dsv3_jax.model.moe.router import Router, RouterStats, router_stats
from pallas_kernels.fp8 import dequantize
from sharding.ep_layout import check_expert_parallel
from sharding.expert_parallel import ExchangeOptions, expert_parallel_ffn, expert_parallel_ffn_local
from sharding.per_shard import on_batch_shards

EXPERT_WEIGHTS = ("experts_gate", "experts_up", "experts_down")   # routed-expert parameters, expert axis first


class MoE(nn.Module):
    """On a sharded mesh the routed experts run expert-parallel (an `expert` axis), or, when their kernels are custom
    calls XLA cannot partition, once per batch shard with every expert whole (sharding.per_shard)."""

    config: ModelConfig
    kernels: KernelSet

    @nn.compact
    def __call__(self, x_BTD, counted_BT=None) -> tuple[jnp.ndarray, RouterStats]:
        """(output, router statistics); the statistics count only the tokens where `counted_BT` is True (default:
        all), though every token is routed and computed."""
        c, split = self.config, self.kernels.experts
        B, T, D = x_BTD.shape
        E, F = c.n_routed_experts, c.moe_intermediate_size
        x_TD = x_BTD.reshape(B * T, D)
        routing = Router(c, name="router")(x_TD)
        ops = MoEKernels.of(self.kernels)
        expert_ffn = functools.partial(swiglu_experts,
                                       grouped_matmul=ops.grouped_matmul_fn(c.fp8, c.fp8_power_of_two_scales))
        # Inside a manual shard_map over `split.axis` (no mesh of its own), this rank holds E/EP contiguous experts.
        local = split is not None and split.mesh is None
        ep = jax.lax.axis_size(split.axis) if local else 1
        if local:
            check_expert_parallel(E, ep, capacity_factor=split.capacity_factor)

        def expert_param(name, shape, axes):
            init = nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), axes)
            w = self.param(name, init, (shape[0] // ep, *shape[1:]), c.jnp_param_dtype)
            if self.has_variable("params", name + fp8_weights.SCALE_SUFFIX):   # kept FP8 (inference)
                scale = self.get_variable("params", name + fp8_weights.SCALE_SUFFIX)
                w = dequantize(w, scale, (fp8_weights.BLOCK, fp8_weights.BLOCK), c.jnp_dtype)
            return w.astype(c.jnp_dtype)

        expert_weights = (expert_param("experts_gate", (E, D, F), ("expert", "embed", "mlp")),
                          expert_param("experts_up", (E, D, F), ("expert", "embed", "mlp")),
                          expert_param("experts_down", (E, F, D), ("expert", "mlp", "embed")))
        x_TD = x_TD.astype(c.jnp_dtype)
        if split is not None:
            options = ExchangeOptions(capacity_factor=split.capacity_factor, node_size=split.node_size,
                                      routing_groups=(c.n_group, c.topk_group), all_to_all=ops.exchange,
                                      node_all_to_all=ops.node_exchange,
                                      codec=ops.wire_codec(c.fp8, c.fp8_power_of_two_scales),
                                      recompute=c.expert_recompute)
        if local:   # this rank's tokens travel to the ranks of their experts and back (dropless)
            routed_TD, _ = expert_parallel_ffn_local(
                x_TD, routing.experts_TK, routing.weights_TK, expert_weights, expert_ffn=expert_ffn,
                expert_axis=split.axis, options=options, out_dtype=c.jnp_dtype)
        elif split is not None:   # experts split over the mesh's expert axis: tokens travel to them and back
            routed_TD, _ = expert_parallel_ffn(x_TD, routing.experts_TK, routing.weights_TK, expert_weights,
                                               expert_ffn=expert_ffn, mesh=split.mesh, expert_axis=split.axis,
                                               options=options, out_dtype=c.jnp_dtype)
        else:
            def routed(x_TD, experts_TK, weights_TK, *w):
                return routed_experts(ops, expert_ffn, x_TD, experts_TK, weights_TK, w, c.jnp_dtype)
            if not ops.partitionable:   # custom calls: per batch shard on a mesh XLA would partition
                routed = on_batch_shards(routed, n_split=3)
            routed_TD = routed(x_TD, routing.experts_TK, routing.weights_TK, *expert_weights)

        out_BTD = routed_TD.reshape(B, T, D)
        if c.n_shared_experts > 0:
            out_BTD = out_BTD + MLP(c, self.kernels, c.n_shared_experts * F, name="shared")(x_BTD)
        return out_BTD, router_stats(routing, B, E, counted_BT)


def routed_experts(ops: MoEKernels, expert_ffn, x_TD, experts_TK, weights_TK, expert_weights: tuple, out_dtype):
    """Σ_k weights_TK · expert_{experts_TK}(x_TD) with every expert local: dispatch → experts → combine."""
    sent = ops.dispatch(x_TD, experts_TK, expert_weights[0].shape[0])
    y_ND = expert_ffn(sent.x_ND, sent.group_sizes_E, *expert_weights)
    return ops.combine(y_ND, weights_TK, sent, out_dtype)
