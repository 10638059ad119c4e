"""RMSNorm, computed in float32 and returned in the input's dtype."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def rms_normalize(x, eps: float):
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        return scale.astype(x.dtype) * rms_normalize(x, self.eps)
