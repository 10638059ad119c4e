"""Device meshes and shardings. Imports jax only; never the model."""

from sharding.mesh import MESH_AXES, MeshError, batch_sharding, build_mesh, put_batch

__all__ = ["MESH_AXES", "MeshError", "batch_sharding", "build_mesh", "put_batch"]
