"""How a kernel's result varies over the manual mesh axes of an enclosing `jax.shard_map` (its `check_vma` typing): a
result varies over every manual axis any operand varies over. Types only: nothing moves, and the kernels' custom
VJPs (not these casts) define their gradients; outside a shard_map both helpers are the identity.
"""

from __future__ import annotations

import jax

import jax_compat


def varying_axes(*operands) -> frozenset:
    """The manual axes any of `operands` varies over."""
    return frozenset().union(*(jax_compat.varying_axes(x) for x in jax.tree.leaves(operands)))


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A pallas_call out_shape for a result of `shape` and `dtype` computed from `operands`: a TPU `pallas_call`
    traced under `check_vma=True` must say on its out_shape how its result varies."""
    return jax_compat.typed_struct(shape, dtype, varying_axes(*operands))


def vary_like(result, *operands):
    """`result` typed as varying over the manual axes `operands` vary over (a GPU kernel's result: a Mosaic GPU
    kernel, `plgpu.kernel`, is traced with the check off and returns a result typed as the same on every device)."""
    return jax_compat.cast_varying(result, varying_axes(*operands))
