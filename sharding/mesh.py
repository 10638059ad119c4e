"""Meshes from axis sizes, and placing train batches and state on them. Axes, outermost first: `data` (replicas),
`fsdp` (parameter-sharded replicas), `pipeline`, `expert`, `tensor`; a size of -1 takes what the others leave.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Outermost first: inner axes take neighbouring devices (a GPU node's 8, a TPU's nearest chips), so the expert
# exchange and tensor parallelism stay on the fast links and the pipeline's small messages cross nodes.
MESH_AXES = ("data", "fsdp", "pipeline", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")   # EP ranks hold different tokens, like data replicas


class MeshError(ValueError):
    """Axis sizes that do not fit the devices; the message names the axis."""


def resolve_axis_sizes(axis_sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Every axis of MESH_AXES with a concrete size whose product is `device_count`."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"mesh.{sorted(unknown)[0]}: not a mesh axis; the axes are {', '.join(MESH_AXES)}")
    sizes = {axis: int(axis_sizes.get(axis, 1)) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshError(f"mesh.{axis}={size}: a size must be positive, or -1 for the remaining devices")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise MeshError(f"mesh.{free[1]}=-1: only one axis may take the remaining devices (mesh.{free[0]} does)")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise MeshError(f"mesh.{free[0]}=-1: the other axes use {fixed} devices, which does not divide "
                            f"the {device_count} devices")
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        shape = " × ".join(f"{axis}={size}" for axis, size in sizes.items() if size != 1) or "1"
        raise MeshError(f"mesh: {shape} uses {fixed} devices, but there are {device_count}")
    return sizes


def build_mesh(axis_sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the axes of MESH_AXES, in that order."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(axis_sizes, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices, dtype=object).reshape(shape)   # no topology-aware layout for this shape
    return Mesh(grid, MESH_AXES)


def expert_node_size(mesh: Mesh, requested: int = 0, axis: str = "expert") -> int:
    """Ranks of `axis` that share a node: `requested` when set (it must divide the axis), else read from the devices
    along the axis: on TPUs a node is a slice (ICI inside, DCN between slices: `slice_index`), elsewhere a host
    (`process_index`; one process per GPU node). The axis size when every rank shares one node; 1 when the ranks
    do not fall into equal contiguous nodes."""
    size = mesh.shape.get(axis, 1)
    if requested:
        if requested < 0 or size % requested:
            raise ValueError(f"mesh.expert_node_size={requested}: must divide mesh.{axis}={size}")
        return requested
    along = np.moveaxis(np.asarray(mesh.devices), mesh.axis_names.index(axis), -1).reshape(-1, size)[0]
    key = lambda d: getattr(d, "slice_index", 0) if d.platform == "tpu" else d.process_index
    keys = [key(d) for d in along]
    run = next((i for i, k in enumerate(keys) if k != keys[0]), size)
    blocks = [keys[i:i + run] for i in range(0, size, run)]
    if size % run or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        return 1
    return run


def batch_sharding(mesh: Mesh, batch_dim: int = 0, ndim: int = 2) -> NamedSharding:
    """Dimension `batch_dim` split over the batch axes, the others replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def put_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray], batch_dim: int = 0) -> dict[str, jax.Array]:
    """Global arrays from this process's rows: each process passes its own slice of `batch_dim`. Batches are split
    over the batch-like axes (`data`, `fsdp`, and `expert`, whose ranks hold different tokens)."""
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, batch_dim, array.ndim), array)
            for name, array in local_batch.items()}
