"""Which dispatch / grouped-matmul / combine implementation the MoE layer uses on this platform, and how (if at
all) the routed experts are split over an `expert` axis while a step is traced: over a mesh (the layer opens its
own shard_map), or over a manual axis of a shard_map the layer already runs inside (it holds local experts)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

from pallas_kernels import dispatch as dispatch_kernels
from pallas_kernels import grouped_matmul as gmm_kernels


@dataclasses.dataclass(frozen=True)
class MoEKernels:
    dispatch_impl: str = "reference"
    grouped_matmul_impl: str = "reference"

    def dispatch(self, x_TD, experts_TK, n_experts):
        return dispatch_kernels.dispatch(x_TD, experts_TK, n_experts, impl=self.dispatch_impl)

    def grouped_matmul(self, x_ND, w_EDF, group_sizes_E):
        return gmm_kernels.grouped_matmul(x_ND, w_EDF, group_sizes_E, impl=self.grouped_matmul_impl)

    def combine(self, y_ND, weights_TK, order_N, out_dtype):
        return dispatch_kernels.combine(y_ND, weights_TK, order_N, out_dtype, impl=self.dispatch_impl)


def default_kernels() -> MoEKernels:
    """The reference kernels on every platform until the Pallas paths land."""
    return MoEKernels()


_EXPERT_MESH: contextvars.ContextVar = contextvars.ContextVar("expert_parallel_mesh", default=None)
_EXPERT_LOCAL: contextvars.ContextVar = contextvars.ContextVar("expert_parallel_local", default=None)


@contextlib.contextmanager
def _expert_setting(mesh, local):
    mesh_token, local_token = _EXPERT_MESH.set(mesh), _EXPERT_LOCAL.set(local)
    try:
        yield
    finally:
        _EXPERT_LOCAL.reset(local_token)
        _EXPERT_MESH.reset(mesh_token)


def expert_parallel(mesh):
    """While active, MoE layers traced here exchange tokens over `mesh`'s `expert` axis (when it is > 1)."""
    return _expert_setting(mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None, None)


def expert_parallel_mesh():
    """The mesh set by `expert_parallel`, or None (all experts local)."""
    return _EXPERT_MESH.get()


@dataclasses.dataclass(frozen=True)
class LocalExpertParallel:
    """Expert parallelism inside a manual shard_map: `axis_name` is manual there, each rank holds E/EP experts."""
    axis_name: str = "expert"
    capacity_factor: float = 1.25


def expert_parallel_local(axis_name: str = "expert", capacity_factor: float = 1.25):
    """While active, MoE layers traced here run inside a shard_map where `axis_name` is manual: their routed-expert
    parameters are this rank's slice (E/EP, D, F) and tokens travel over `axis_name` (sharding.expert_parallel's
    per-rank body). Any `expert_parallel(mesh)` around it is suspended (no nested shard_map)."""
    return _expert_setting(None, LocalExpertParallel(axis_name, capacity_factor))


def expert_parallel_local_axis() -> LocalExpertParallel | None:
    """The setting of the innermost `expert_parallel_local`, or None."""
    return _EXPERT_LOCAL.get()
