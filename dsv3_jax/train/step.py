"""The train step: forward with aux outputs, loss, gradients, AdamW update, routing-bias update.

State is a pytree (`TrainState`) so the step can be jitted with shardings and checkpointed whole.
The tokens-seen counter lives on the host (an exact Python int) and enters as a float32 argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, init_variables
from dsv3_jax.train.balance import update_routing_bias
from dsv3_jax.train.loss import LossWeights, total_loss
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.schedule import ScheduleConfig, learning_rate


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    gamma: float = 0.001             # bias update speed
    gamma_zero_after: float = -1     # set γ to 0 from this many steps/tokens on (-1: never)
    unit: str = "steps"


class TrainState(flax.struct.PyTreeNode):
    step: jnp.ndarray
    params: Any
    moe_bias: Any
    opt_state: Any


def create_train_state(config: ModelConfig, tx: optax.GradientTransformation, rng) -> TrainState:
    variables = init_variables(config, rng)
    params = variables["params"]
    return TrainState(jnp.zeros([], jnp.int32), params, variables.get("moe_bias", {}), tx.init(params))


def balance_gamma(config: BalanceConfig, step, tokens):
    if config.gamma_zero_after < 0:
        return jnp.float32(config.gamma)
    t = jnp.asarray(tokens if config.unit == "tokens" else step, jnp.float32)
    return jnp.where(t >= config.gamma_zero_after, 0.0, config.gamma).astype(jnp.float32)


def make_train_step(model_config: ModelConfig, loss_weights: LossWeights, schedule: ScheduleConfig,
                    optimizer: OptimizerConfig, balance: BalanceConfig,
                    mtp_weight_fn: Callable | None = None):
    """Return (tx, step_fn); step_fn(state, batch, tokens_seen) -> (state, metrics), pure and jittable.

    `batch` holds `tokens` (B, T) int32 and optionally `segment_ids` and `positions` (B, T) int32.
    `mtp_weight_fn(step, tokens)` overrides the constant λ of `loss_weights` (DeepSeek's λ schedule).
    """
    model = DeepSeekV3(model_config)
    tx = make_optimizer(optimizer)

    def loss_fn(params, moe_bias, batch, mtp_weight):
        outputs = model.apply({"params": params, "moe_bias": moe_bias}, batch["tokens"], batch.get("positions"),
                              batch.get("segment_ids"), return_aux=True)
        weights = dataclasses.replace(loss_weights, mtp=mtp_weight)
        loss, metrics = total_loss(outputs, batch["tokens"], batch.get("segment_ids"), weights)
        return loss, (metrics, outputs._replace(logits_BTV=None, mtp_logits_DBTV=None))

    def step_fn(state: TrainState, batch, tokens_seen):
        mtp_weight = loss_weights.mtp if mtp_weight_fn is None else mtp_weight_fn(state.step, tokens_seen)
        grads, (metrics, aux) = jax.grad(loss_fn, has_aux=True)(state.params, state.moe_bias, batch, mtp_weight)
        lr = learning_rate(schedule, state.step, tokens_seen)
        opt_state = state.opt_state
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moe_bias = update_routing_bias(state.moe_bias, aux, balance_gamma(balance, state.step, tokens_seen))
        metrics = dict(metrics, lr=lr, grad_norm=optax.global_norm(grads))
        if aux.moe_stats is not None:
            counts = aux.moe_stats.expert_counts_E
            metrics["max_load_ratio"] = jnp.max(counts.max(-1) / jnp.maximum(counts.mean(-1), 1e-9))
        return TrainState(state.step + 1, params, moe_bias, opt_state), metrics

    return tx, step_fn
