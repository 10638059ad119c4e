"""Reference grouped matmul: y[rows of group g] = x[rows of g] · W[g], via jax.lax.ragged_dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x_MK, w_GKN, group_sizes_G):
    """Rows of x are contiguous by group (sizes `group_sizes_G`, summing to <= M); other rows give 0."""
    return jax.lax.ragged_dot(x_MK, w_GKN.astype(x_MK.dtype), group_sizes_G.astype(jnp.int32))
