"""Cost estimates for Pallas calls: XLA cannot see inside a kernel, so each call states its flops and the bytes it
moves (from its shapes), which XLA's cost model and scheduler then use like those of its own ops."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental import pallas as pl


def nbytes(*arrays) -> int:
    """Total bytes of arrays or ShapeDtypeStructs (None entries count 0)."""
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None)


def cost_estimate(flops: int, bytes_accessed: int, transcendentals: int = 0,
                  remote_bytes_transferred: int = 0) -> pl.CostEstimate:
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed),
                           remote_bytes_transferred=int(remote_bytes_transferred))
