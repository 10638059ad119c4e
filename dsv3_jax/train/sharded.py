"""The train step on a mesh: shardings of the whole TrainState from the logical-axis rules, and the step
jitted with explicit input and output shardings (state donated)."""

from __future__ import annotations

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import logical_axes
from dsv3_jax.train.step import TrainState
from sharding.mesh import BATCH_AXES, batch_sharding
from sharding.rules import logical_rules, tree_shardings

def state_shardings(config: ModelConfig, tx: optax.GradientTransformation, abstract_state: TrainState, mesh: Mesh,
                    strategy: str = "replicated") -> TrainState:
    """NamedShardings for every leaf of `abstract_state` (from jax.eval_shape of create_train_state)."""
    rules = logical_rules(strategy)
    specs = logical_axes(config)
    # On a pipeline mesh every parameter is stored split over `pipeline` too: a stacked layer axis when it divides
    # into the stages, else the largest dimension it divides (the step moves each stage's layers to its devices).
    # Under FSDP a leaf with no `embed` dimension (MLA's up-projections) is split too, over fsdp and expert.
    pipeline = ("pipeline",) if mesh.shape.get("pipeline", 1) > 1 else ()
    fsdp = ("fsdp", "expert") if strategy == "fsdp" else ()
    params = tree_shardings(specs["params"], abstract_state.params, mesh, rules, extra=pipeline + fsdp)
    bias = tree_shardings(specs.get("moe_bias", {}), abstract_state.moe_bias, mesh, rules)
    moments = tree_shardings(specs["params"], abstract_state.params, mesh, rules,
                             extra=pipeline + fsdp + (BATCH_AXES if strategy == "zero1" else ()))
    everywhere = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state.opt_state, moments,
                                transform_non_params=lambda _: everywhere)
    return TrainState(everywhere, params, bias, opt, everywhere)


def jit_sharded_step(step_fn, shardings: TrainState, mesh: Mesh, batch_dim: int = 1, manual: bool = False,
                     compiler_options: dict | None = None):
    """step_fn(state, batches, tokens_seen, loss_limit) jitted for `mesh`; batches split on `batch_dim`; XLA
    `compiler_options` (a dict) for every compile of it.

    The model's activation constraints (batch over the data-parallel axes, heads / mlp / vocab over `tensor`)
    resolve through the logical-axis rules while tracing, except in a `manual` step_fn, one that runs the model
    inside its own shard_map over every axis (the pipelined step).
    """
    # Activations follow the parameter-free rules: `embed` stays whole inside a replica even under FSDP.
    flax_rules = tuple((name, axes) for name, axes in logical_rules("replicated"))

    def constrained(state, batches, tokens_seen, loss_limit):
        if manual:
            return step_fn(state, batches, tokens_seen, loss_limit)
        with nn.logical_axis_rules(flax_rules):
            return step_fn(state, batches, tokens_seen, loss_limit)

    batch = batch_sharding(mesh, batch_dim, ndim=batch_dim + 2)
    everywhere = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(constrained, in_shardings=(shardings, batch, everywhere, everywhere),
                     out_shardings=(shardings, everywhere), donate_argnums=0,
                     compiler_options=compiler_options or None)

    def run(state, batches, tokens_seen, loss_limit):
        with jax.set_mesh(mesh):
            return jitted(state, batches, tokens_seen, loss_limit)

    def lower(*args):
        with jax.set_mesh(mesh):
            return jitted.lower(*args)

    run.lower = lower
    return run
