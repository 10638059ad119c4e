"""Running a function once per batch shard of a mesh, inside a shard_map: how kernels that XLA cannot partition
(Pallas TPU and Mosaic GPU custom calls) run on a sharded mesh.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from sharding.mesh import BATCH_AXES


def batch_axes(mesh) -> tuple[str, ...]:
    """The mesh's batch axes (BATCH_AXES present in it), outermost first."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def auto_mesh():
    """The (abstract) mesh of the enclosing `jax.set_mesh` if XLA partitions what is traced here: more than one
    device and no manual axis. None otherwise (no mesh, one device, or inside a shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size <= 1 or mesh.manual_axes:
        return None
    return mesh


def per_batch_shard(fn: Callable, mesh, n_split: int) -> Callable:
    """fn(*args) with args[:n_split] and every output split on dim 0 over `mesh`'s batch axes, args[n_split:] whole.

    Every mesh axis is manual inside, so `fn` sees one device's rows; the varying-axes check is off because not
    every kernel types its results by the axes they vary over (pallas_kernels.vma). The split dimension must divide
    by the product of the batch axes (batch rows do, being split so already). The whole arguments are whole on
    every device: XLA gathers a parameter-sharded one first, as FSDP does anyway, and the shard_map's transpose sums
    its gradient over the batch shards.
    """
    rows = P(batch_axes(mesh) or None)

    def run(*args):
        in_specs = tuple(rows if i < n_split else P() for i in range(len(args)))
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(*args)

    return run


def on_batch_shards(fn: Callable, n_split: int) -> Callable:
    """per_batch_shard over `auto_mesh()` where there is one; `fn` itself otherwise.

    That is, under the mesh of an enclosing `jax.set_mesh` (dsv3_jax.train.sharded traces the step under one) when
    XLA would otherwise have to partition `fn`: the mesh spans several devices and none of its axes is manual yet.
    Inside a shard_map (expert parallelism, the pipeline executor) `fn` already sees one device's data and runs as it
    is."""
    mesh = auto_mesh()
    return fn if mesh is None else per_batch_shard(fn, mesh, n_split)
