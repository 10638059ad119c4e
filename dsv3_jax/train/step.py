"""The train step: forward with aux outputs, loss, gradients (accumulated over micro-batches),
AdamW update, routing-bias update, and the guard that skips non-finite or spiking updates.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model import DeepSeekV3, ModelOutputs, head_logits, head_weight, init_variables
from dsv3_jax.model.moe.router import RouterStats
from dsv3_jax.train.balance import update_routing_bias
from dsv3_jax.train.loss import LossConfig, target_counts, total_loss
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.schedule import ScheduleConfig, as_float32, learning_rate


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    gamma: float = 0.001             # bias update speed
    gamma_zero_after: float = -1     # γ becomes 0 from this many steps/tokens on (-1: never)
    unit: str = "steps"


class TrainState(flax.struct.PyTreeNode):
    """The whole training state as one pytree, so the step can be jitted with shardings and checkpointed whole."""

    step: jnp.ndarray
    params: Any
    moe_bias: Any
    opt_state: Any
    rng: jnp.ndarray


def create_train_state(config: ModelConfig, tx: optax.GradientTransformation, rng) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = init_variables(config, init_rng)
    params = variables["params"]
    return TrainState(jnp.zeros([], jnp.int32), params, variables.get("moe_bias", {}), tx.init(params),
                      jax.random.key_data(state_rng))


def _switch(value_before, value_after, switch_after, unit, step, tokens):
    if switch_after < 0:
        return jnp.float32(value_before)
    t = as_float32(tokens if unit == "tokens" else step)
    return jnp.where(t >= switch_after, value_after, value_before).astype(jnp.float32)


def make_accumulate(model_config: ModelConfig, kernels: KernelSet, loss: LossConfig):
    """accumulate(params, moe_bias, batches, mtp_weight) -> (grads, metrics, aux) over the A micro-batches of
    `batches` ((A, B, T) leaves, like step_fn's), one at a time.

    The loss is the step's, not a mean of per-micro-batch losses: each cross-entropy is the sum over every
    micro-batch's valid targets divided by the step's count of them (micro-batches holding different numbers of real
    tokens weigh by those numbers), and the balance term is the mean of the micro-batches' means over their rows
    (equal rows each: the mean over the step's rows). Metrics are the step's; aux's expert counts are sums and its
    balance losses means.
    """
    model = DeepSeekV3(model_config, kernels)
    logits_fn = functools.partial(head_logits, model_config)
    n_offsets = 1 + model_config.num_mtp_modules

    def loss_fn(params, moe_bias, batch, mtp_weight, counts_O, balance_weight):
        # logits=False: the loss applies the head in chunks of positions (no [B, T, V] float32 logits)
        outputs = model.apply({"params": params, "moe_bias": moe_bias}, batch["tokens"], batch.get("positions"),
                              batch.get("segment_ids"), return_aux=True, logits=False)
        value, metrics = total_loss(outputs, logits_fn, head_weight(model_config, params), batch["tokens"],
                                    batch.get("segment_ids"), mtp_weight, loss.balance_alpha, loss.z_loss,
                                    loss.logits_chunk, counts_O, balance_weight, model_config.jnp_dtype,
                                    loss.vocab_chunk)
        return value, (metrics, outputs._replace(head_in_BTD=None, mtp_head_in_ZBTD=None))

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulate(params, moe_bias, batches, mtp_weight):
        n = batches["tokens"].shape[0]
        rows = lambda x: x.reshape(-1, x.shape[-1])
        segment_ids = batches.get("segment_ids")
        counts_O = target_counts(rows(batches["tokens"]), None if segment_ids is None else rows(segment_ids),
                                 n_offsets)

        def one_grad(batch):
            grads, (metrics, aux) = grad_fn(params, moe_bias, batch, mtp_weight, counts_O, 1.0 / n)
            return grads, metrics, aux

        def one(carry, batch):
            return jax.tree.map(jnp.add, carry, one_grad(batch)), None

        total = one_grad(jax.tree.map(lambda x: x[0], batches))
        if n > 1:
            total, _ = jax.lax.scan(one, total, jax.tree.map(lambda x: x[1:], batches))
        grads, metrics, aux = total
        # Expert counts are sums over every routed token; the balance-loss terms are means.
        aux = aux._replace(moe_stats=_mean_loss(aux.moe_stats, n), mtp_stats=_mean_loss(aux.mtp_stats, n))
        return grads, metrics, aux

    return accumulate


def make_train_step(model_config: ModelConfig, kernels: KernelSet, loss: LossConfig, schedule: ScheduleConfig,
                    optimizer: OptimizerConfig, balance: BalanceConfig):
    """Return (tx, step_fn), the model running `kernels` (dsv3_jax.kernels.resolve).

    step_fn(state, batches, tokens_seen, loss_limit) -> (state, metrics) is pure and jittable. The tokens-seen
    counter lives on the host (an exact Python int) and enters as a float32 argument.
    `batches` holds `tokens` (A, B, T) int32 and optionally `segment_ids` and `positions`: A micro-batches
    whose gradients are accumulated into the step's (make_accumulate). An update whose loss or gradient norm is not
    finite, or whose loss exceeds `loss_limit`, is not applied (metrics["skipped"] = 1); the step counter still
    advances.
    """
    tx = make_optimizer(optimizer)
    accumulate = make_accumulate(model_config, kernels, loss)

    def step_fn(state: TrainState, batches, tokens_seen, loss_limit):
        mtp_weight = mtp_weight_at(loss, state.step, tokens_seen)
        grads, metrics, aux = accumulate(state.params, state.moe_bias, batches, mtp_weight)
        new_state, metrics = apply_update(tx, schedule, balance, state, grads, metrics, aux, tokens_seen, loss_limit)
        metrics["mtp_weight"] = mtp_weight
        if aux.moe_stats is not None:
            metrics["expert_counts_LE"] = aux.moe_stats.expert_counts_E
        return new_state, metrics

    return tx, step_fn


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def mtp_weight_at(loss: LossConfig, step, tokens_seen):
    """λ of the MTP loss for the update at `step` after `tokens_seen` tokens."""
    return _switch(loss.mtp_weight, loss.mtp_weight_after, loss.mtp_switch_after, loss.mtp_switch_unit, step,
                   tokens_seen)


def apply_update(tx: optax.GradientTransformation, schedule: ScheduleConfig, balance: BalanceConfig,
                 state: TrainState, grads, metrics: dict, aux: ModelOutputs, tokens_seen, loss_limit):
    """AdamW at the scheduled rate, the routing-bias update from `aux`'s expert counts, and the guard: an update
    whose loss or gradient norm is not finite, or whose loss exceeds `loss_limit`, is not applied."""
    lr = learning_rate(schedule, state.step, tokens_seen)
    # A new hyperparams dict: writing into state.opt_state's would leak the rate into a skipped update.
    opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gamma = _switch(balance.gamma, 0.0, balance.gamma_zero_after, balance.unit, state.step, tokens_seen)
    moe_bias = update_routing_bias(state.moe_bias, aux, gamma)
    grad_norm = global_norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & (metrics["loss"] <= loss_limit)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(state.step + 1, keep(params, state.params), keep(moe_bias, state.moe_bias),
                           keep(opt_state, state.opt_state), state.rng)
    return new_state, dict(metrics, lr=lr, grad_norm=grad_norm, skipped=(~ok).astype(jnp.int32))


def _mean_loss(stats: RouterStats | None, n: int):
    return None if stats is None else stats._replace(balance_loss=stats.balance_loss / n)
