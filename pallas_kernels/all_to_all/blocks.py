"""jax.lax.all_to_all's semantics (split / concat axes, tiled or not, its transpose) over a kernel that only
exchanges whole blocks: out[j] = block `me` of peer j's x, for x of shape [n, ...]."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jax_compat

# The kernels run in a name scope of this prefix and the number of devices exchanging: XLA sees only a custom call,
# and experiments.estimate prices it as an all-to-all among that many devices of one node (or TPU slice).
SCOPE_PREFIX = "pallas_all_to_all_g"


def check_axes(x, n: int, axis_name, split_axis: int, concat_axis: int, tiled: bool) -> tuple[int, int]:
    """The split and concat axes normalised, or a ValueError naming what does not fit an all-to-all over n."""
    if not isinstance(axis_name, str):
        raise ValueError(f"all_to_all: axis_name={axis_name!r} must be one mesh axis name")
    split_axis, concat_axis = split_axis % x.ndim, concat_axis % x.ndim
    if x.shape[split_axis] % n if tiled else x.shape[split_axis] != n:
        raise ValueError(f"all_to_all: x.shape[{split_axis}]={x.shape[split_axis]} must "
                         f"{'be divisible by' if tiled else 'equal'} the {n} devices it is exchanged among")
    return split_axis, concat_axis


def block_shape(shape: tuple[int, ...], n: int, split_axis: int, tiled: bool) -> tuple[int, ...]:
    """The shape of one device's block of an array of `shape` split n ways along split_axis."""
    if tiled:
        return (*shape[:split_axis], shape[split_axis] // n, *shape[split_axis + 1:])
    return (*shape[:split_axis], *shape[split_axis + 1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 2, 3, 4, 5))
def block_all_to_all(exchange: Callable, x, n: int, split_axis: int, concat_axis: int, tiled: bool):
    """lax.all_to_all over n devices, with `exchange(blocks_nX) -> blocks_nX` moving the blocks (a hashable
    callable: it is a static argument). Its transpose is the same with split and concat axes swapped."""
    if n == 1:
        return x if tiled else jnp.moveaxis(x, split_axis, concat_axis)
    if tiled:
        shape = x.shape
        blocks = jnp.moveaxis(x.reshape(*shape[:split_axis], n, shape[split_axis] // n, *shape[split_axis + 1:]),
                              split_axis, 0)
        got = jnp.moveaxis(exchange(blocks), 0, concat_axis)
        merged = list(got.shape)
        merged[concat_axis:concat_axis + 2] = [n * merged[concat_axis + 1]]
        return got.reshape(merged)
    return jnp.moveaxis(exchange(jnp.moveaxis(x, split_axis, 0)), 0, concat_axis)


def _fwd(exchange, x, n, split_axis, concat_axis, tiled):
    return block_all_to_all(exchange, x, n, split_axis, concat_axis, tiled), None


def _bwd(exchange, n, split_axis, concat_axis, tiled, _, ct):
    return (block_all_to_all(exchange, ct, n, concat_axis, split_axis, tiled),)


block_all_to_all.defvjp(_fwd, _bwd)


def unchecked(kernel: Callable, x, axis_name: str, group: int):
    """kernel(x), an exchange among `group` devices, traced outside the enclosing shard_map's varying-axes checks
    (its axis_index arithmetic would be traced with `pvary` casts, which Mosaic cannot lower, JAX 0.10) in the
    SCOPE_PREFIX name scope; its result typed as varying like x and over `axis_name`."""
    mesh = jax.sharding.get_abstract_mesh()
    with jax.named_scope(f"{SCOPE_PREFIX}{group}"):
        out = jax.shard_map(kernel, mesh=mesh, in_specs=P(), out_specs=P(), axis_names=frozenset(),
                            check_vma=False)(x)
    return jax_compat.cast_varying(out, jax_compat.varying_axes(x) | {axis_name})
