"""AdamW as DeepSeek-V3 trained it: β (0.9, 0.95), weight decay 0.1 except on norms, global-norm
clipping, optional BF16 moments; the learning rate is injected each step from the schedule."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0          # 0 disables clipping
    moments_dtype: str = "float32"  # or "bfloat16"


class ScaleByAdamState(NamedTuple):
    count: jnp.ndarray
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moments_dtype) -> optax.GradientTransformation:
    """Adam's update direction with both moments stored in `moments_dtype` (math in float32)."""
    dtype = jnp.dtype(moments_dtype)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)
        return ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          state.nu, grads)
        mu_hat_scale = 1.0 / (1 - b1 ** count.astype(jnp.float32))
        nu_hat_scale = 1.0 / (1 - b2 ** count.astype(jnp.float32))
        updates = jax.tree.map(lambda m, v: (m * mu_hat_scale) / (jnp.sqrt(v * nu_hat_scale) + eps), mu, nu)
        cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
        return updates, ScaleByAdamState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def decay_mask(params):
    """True for weights that take weight decay: everything except norm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW whose `learning_rate` hyperparameter the train step sets every update."""

    @optax.inject_hyperparams
    def adamw(learning_rate):
        parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
        parts += [
            scale_by_adam(config.b1, config.b2, config.eps, config.moments_dtype),
            optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(learning_rate),
        ]
        return optax.chain(*parts)

    return adamw(learning_rate=0.0)
