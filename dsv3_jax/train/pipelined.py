"""The pipeline-parallel train step: make_train_step's state, batches and results, with the model's gradients from
sharding.pipeline's executor over the mesh's `pipeline` axis (micro-batches = gradient-accumulation micro-batches).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.sharding import Mesh

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model import ModelOutputs
from dsv3_jax.model.moe.router import RouterStats
from dsv3_jax.train.loss import LossConfig
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.schedule import ScheduleConfig
from dsv3_jax.train.stages import (SPLIT_MIN_SIZE, StageFns, StageLayout, end_specs, join_gradients,
                                   micro_batch_data, split_variables, stack_layers, stage_specs)
from dsv3_jax.train.step import BalanceConfig, TrainState, apply_update, mtp_weight_at
from sharding.ep_layout import check_expert_parallel
from sharding.pipeline import Plan, batch_shards, compile_plan, pipeline_value_and_grad
from sharding.pipeline_schedules import Schedule

MEAN_METRICS = ("ce", "mtp_ce", "balance")


def pipeline_plan(model_config: ModelConfig, pipeline: Schedule, fuse_pairs: bool = False,
                  recompute: bool = True) -> Plan:
    """The executor's plan for the model cut into `pipeline`'s stages (StageLayout.balanced): the one the step
    built by make_pipelined_train_step runs (compile_plan is cached, so both get the same object)."""
    layout = StageLayout.balanced(model_config, pipeline.n_stages)
    return compile_plan(pipeline, fuse_pairs, layout.real, recompute)


def make_pipelined_train_step(model_config: ModelConfig, kernels: KernelSet, loss: LossConfig, schedule: ScheduleConfig,
                              optimizer: OptimizerConfig, balance: BalanceConfig, mesh: Mesh, pipeline: Schedule,
                              split_min_size: int = SPLIT_MIN_SIZE, fuse_pairs: bool = False,
                              recompute: bool = True):
    """Return (tx, step_fn) like make_train_step, for `mesh` (a `pipeline` axis) and the pipeline schedule
    `pipeline` (sharding.pipeline_schedules.make_schedule), the model running `kernels` (every expert local: the
    stages split them over `expert` themselves).

    step_fn(state, batches, tokens_seen, loss_limit) -> (state, metrics), with batches["tokens"] of shape
    (pipeline.n_micro, B, T) (optionally "segment_ids", "positions"); B splits over the mesh's batch axes. The MoE stack's
    n_layers − first_k_dense_replace layers go to the stages by StageLayout.balanced (ValueError when there are
    fewer than stages).
    With mesh.expert > 1 the stages' MoE layers run expert-parallel (E/EP routed experts per rank); the MTP
    modules' too. The first and last stages' leaves of at least `split_min_size` elements are split over the batch
    axes and gathered where used (stages.end_specs).
    The state keeps the ordinary parameter layout (checkpoints are interchangeable); each step splits it into stages
    (dsv3_jax.train.stages) and joins the gradients back before AdamW, the routing-bias update and the skip guard.
    """
    n_stages = mesh.shape["pipeline"]
    expert_axis = "expert" if mesh.shape.get("expert", 1) > 1 else None
    if expert_axis:
        check_expert_parallel(model_config.n_routed_experts, mesh.shape[expert_axis])
    layout = StageLayout.balanced(model_config, n_stages)
    fns = StageFns(model_config, kernels, loss, layout, expert_axis)
    batch_axes = batch_shards(mesh)[0]

    def value_and_grad(stage_vars, first_params, last_vars, *data):
        first_specs = end_specs(first_params, mesh, expert_axis, batch_axes, split_min_size)
        last_specs = end_specs(last_vars, mesh, expert_axis, batch_axes, split_min_size)
        return pipeline_value_and_grad(
            fns.stage, functools.partial(fns.loss, last_specs), mesh, pipeline, pipeline.n_micro,
            first_fn=functools.partial(fns.first, first_specs), has_aux=True,
            stage_param_specs=stage_specs(stage_vars, "pipeline", expert_axis), first_param_specs=first_specs,
            last_param_specs=last_specs, fuse_pairs=fuse_pairs, stage_variants=layout.real, recompute=recompute)(
            stage_vars, first_params, last_vars, *data)

    n_means = pipeline.n_micro * batch_shards(mesh)[1]   # the executor sums aux outputs over micro-batches and batch shards
    tx = make_optimizer(optimizer)

    def step_fn(state: TrainState, batches, tokens_seen, loss_limit):
        mtp_weight = mtp_weight_at(loss, state.step, tokens_seen)
        stage_vars, first_params, last_vars = split_variables(model_config, state.params, state.moe_bias, layout)
        inputs, targets, side, n_tokens = micro_batch_data(model_config, batches)
        (value, (counts_PLE, sums)), (g_stage, g_first, g_last) = value_and_grad(
            stage_vars, first_params, dict(last_vars, mtp_weight=mtp_weight), inputs, targets, side)
        grads = join_gradients(layout, g_stage, g_first, g_last)   # moe_bias, mtp_weight, real: dropped
        metrics = {k: sums[k] / n_means for k in MEAN_METRICS if k in sums}
        metrics.update(loss=value, tokens=n_tokens)
        counts_LE = stack_layers(layout, counts_PLE)
        mtp_counts = sums.get("mtp_counts_ZE")
        no_loss = lambda counts: RouterStats(counts, jnp.zeros(counts.shape[:-1], jnp.float32))
        aux = ModelOutputs(None, None, no_loss(counts_LE), None if mtp_counts is None else no_loss(mtp_counts))

        new_state, metrics = apply_update(tx, schedule, balance, state, grads, metrics, aux, tokens_seen, loss_limit)
        return new_state, dict(metrics, mtp_weight=mtp_weight, expert_counts_LE=counts_LE)

    return tx, step_fn
