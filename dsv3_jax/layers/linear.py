"""A bias-free linear layer whose kernel carries logical axis names for sharding."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Linear(nn.Module):
    features: int
    axes: tuple[str, str]
    init_std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None   # accumulate into this dtype (e.g. float32 logits from bf16 inputs)

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=self.out_dtype)


def make_linear(config, features: int, axes: tuple[str, str], name: str, out_dtype=None) -> Linear:
    return Linear(features, axes, config.initializer_range, config.jnp_dtype, config.jnp_param_dtype, out_dtype,
                  name=name)
