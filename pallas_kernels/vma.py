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
from jax import lax


def varying_axes(*operands) -> frozenset:
    """The manual axes any of `operands` varies over (JAX 0.10+: `.manual_axis_type.varying`; before: `.vma`)."""
    axes = frozenset()
    for x in jax.tree.leaves(operands):
        aval = jax.typeof(x)
        mat = getattr(aval, "manual_axis_type", None)
        varying = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
        axes |= frozenset(varying or ())
    return axes


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A pallas_call out_shape for a result of `shape` and `dtype` computed from `operands`."""
    axes = varying_axes(*operands)
    if hasattr(jax.sharding, "ManualAxisType"):
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
    return jax.ShapeDtypeStruct(shape, dtype, vma=axes)


def vary_like(result, *operands):
    """`result` typed as varying over the manual axes `operands` vary over (a GPU kernel's result)."""
    missing = tuple(sorted(varying_axes(*operands) - varying_axes(result)))
    if not missing:
        return result
    return lax.pcast(result, missing, to="varying") if hasattr(lax, "pcast") else lax.pvary(result, missing)
