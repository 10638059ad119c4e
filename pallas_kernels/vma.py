"""How a kernel's result varies over the manual mesh axes of an enclosing `jax.shard_map` (its `check_vma` typing).

The kernels compute per-device results from per-device operands, so a result varies over every manual axis any
operand varies over. A TPU `pallas_call` traced under `check_vma=True` must say so on its out_shape (`out_struct`);
a Mosaic GPU kernel (`plgpu.kernel`) is traced with the check off and returns a result typed as the same on every
device, which `vary_like` types back as varying. Both are types only: nothing moves between devices, and the
kernels' custom VJPs (not these casts) define their gradients. Outside a shard_map every operand varies over nothing
and both are the identity.
"""

from __future__ import annotations

import jax

import jax_compat


def varying_axes(*operands) -> frozenset:
    """The manual axes any of `operands` varies over."""
    return frozenset().union(*(jax_compat.varying_axes(x) for x in jax.tree.leaves(operands)))


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A pallas_call out_shape for a result of `shape` and `dtype` computed from `operands`."""
    return jax_compat.typed_struct(shape, dtype, varying_axes(*operands))


def vary_like(result, *operands):
    """`result` typed as varying over the manual axes `operands` vary over (a GPU kernel's result)."""
    return jax_compat.cast_varying(result, varying_axes(*operands))
