"""The DeepSeekMoE layer: route, dispatch, grouped SwiGLU experts, weighted combine, plus shared experts.

Dropless: every (token, choice) pair is computed; the grouped matmul takes ragged groups. On a sharded mesh the
routed experts run expert-parallel (an `expert` axis), or, when their kernels are custom calls XLA cannot
partition, once per batch shard with every expert whole (sharding.per_shard).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers.mlp import MLP
from dsv3_jax import kernels as kernel_registry
from dsv3_jax.model.moe.backend import MoEKernels, expert_parallel_local_axis, expert_parallel_mesh
from dsv3_jax.model.moe.router import Router, RouterStats, router_stats
from sharding.ep_buffers import capacity_per_peer
from sharding.ep_layout import check_expert_parallel
from sharding.expert_ffn import swiglu_experts
from sharding.expert_parallel import expert_parallel_ffn, expert_parallel_ffn_local
from sharding.per_shard import on_batch_shards

EXPERT_WEIGHTS = ("experts_gate", "experts_up", "experts_down")   # routed-expert parameters, expert axis first


class MoE(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, counted_BT=None) -> tuple[jnp.ndarray, RouterStats]:
        """(output, router statistics); the statistics count only the tokens where `counted_BT` is True (default:
        all), though every token is routed and computed."""
        c = self.config
        B, T, D = x_BTD.shape
        E, F = c.n_routed_experts, c.moe_intermediate_size
        x_TD = x_BTD.reshape(B * T, D)
        routing = Router(c, name="router")(x_TD)
        kernels, mesh, local = kernel_registry.select(c).moe(), expert_parallel_mesh(), expert_parallel_local_axis()
        grouped_matmul = kernels.grouped_matmul_fn(c.fp8, c.fp8_power_of_two_scales)
        # Inside a manual shard_map over `local.axis_name`, this rank holds E/EP contiguous experts.
        ep = jax.lax.axis_size(local.axis_name) if local is not None else 1
        if local is not None:
            check_expert_parallel(E, ep, capacity_factor=local.capacity_factor)

        def expert_weights(name, shape, axes):
            init = nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), axes)
            return self.param(name, init, (shape[0] // ep, *shape[1:]), c.jnp_param_dtype).astype(c.jnp_dtype)

        w_gate_EDF = expert_weights("experts_gate", (E, D, F), ("expert", "embed", "mlp"))
        w_up_EDF = expert_weights("experts_up", (E, D, F), ("expert", "embed", "mlp"))
        w_down_EFD = expert_weights("experts_down", (E, F, D), ("expert", "mlp", "embed"))

        if local is not None:   # this rank's tokens travel to the ranks of their experts and back (dropless)
            K = routing.experts_TK.shape[1]
            routed_TD, _ = expert_parallel_ffn_local(
                x_TD.astype(c.jnp_dtype), routing.experts_TK, routing.weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD,
                expert_axis=local.axis_name, capacity=capacity_per_peer(B * T * K, ep, local.capacity_factor),
                grouped_matmul=grouped_matmul, out_dtype=c.jnp_dtype, all_to_all=kernels.exchange)
        elif mesh is None:
            def routed(x_TD, experts_TK, weights_TK, *w):
                return routed_experts(kernels, grouped_matmul, x_TD, experts_TK, weights_TK, *w, c.jnp_dtype)
            if not kernels.partitionable:   # custom calls: per batch shard on a mesh XLA would partition
                routed = on_batch_shards(routed, n_split=3)
            routed_TD = routed(x_TD.astype(c.jnp_dtype), routing.experts_TK, routing.weights_TK, w_gate_EDF,
                               w_up_EDF, w_down_EFD)
        else:   # experts split over the mesh's `expert` axis: tokens travel to them and back (dropless)
            routed_TD, _ = expert_parallel_ffn(x_TD.astype(c.jnp_dtype), routing.experts_TK, routing.weights_TK,
                                               w_gate_EDF, w_up_EDF, w_down_EFD, mesh=mesh,
                                               grouped_matmul=grouped_matmul, out_dtype=c.jnp_dtype,
                                               all_to_all=kernels.exchange)

        out_BTD = routed_TD.reshape(B, T, D)
        if c.n_shared_experts > 0:
            out_BTD = out_BTD + MLP(c, c.n_shared_experts * F, name="shared")(x_BTD)
        return out_BTD, router_stats(routing, B, E, counted_BT)


def routed_experts(kernels: MoEKernels, grouped_matmul, x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF,
                   w_down_EFD, out_dtype):
    """Σ_k weights_TK · SwiGLU_{experts_TK}(x_TD) with every expert local: dispatch → grouped matmuls → combine."""
    sent = kernels.dispatch(x_TD, experts_TK, w_gate_EDF.shape[0])
    y_ND = swiglu_experts(sent.x_ND, sent.group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, grouped_matmul)
    return kernels.combine(y_ND, weights_TK, sent, out_dtype)
