"""The MoE layer's routed-expert ops as one bundle (chosen by dsv3_jax.kernels from the config), and how (if at
all) the routed experts are split over an `expert` axis while a step is traced: over a mesh (the layer opens its
own shard_map), or over a manual axis of a shard_map the layer already runs inside (it holds local experts)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable

from pallas_kernels import dispatch as dispatch_kernels
from pallas_kernels import grouped_matmul as gmm_kernels


@dataclasses.dataclass(frozen=True)
class MoEKernels:
    """The routed experts' kernels: dispatch/combine and grouped matmul implementations by name (`reference`,
    `tpu`, `gpu`), `interpret` to run Pallas kernels in their CPU interpreters, and `exchange` (None: lax) the
    all-to-all the expert-parallel paths move rows with."""
    dispatch_impl: str = "reference"
    grouped_matmul_impl: str = "reference"
    interpret: bool = False
    exchange: Callable | None = None

    def dispatch(self, x_TD, experts_TK, n_experts):
        return dispatch_kernels.dispatch(x_TD, experts_TK, n_experts, impl=self.dispatch_impl,
                                         interpret=self.interpret)

    def grouped_matmul_fn(self, fp8: bool = False, power_of_two: bool = False) -> Callable:
        """(x_ND, w_EDF, group_sizes_E) -> y_NF, differentiable; FP8 block-scaled operands in all three GEMMs when
        `fp8` (DeepSeek-V3's recipe for the routed experts)."""
        if fp8:
            return functools.partial(gmm_kernels.grouped_matmul_fp8, impl=self.grouped_matmul_impl,
                                     interpret=self.interpret, power_of_two=power_of_two)
        return functools.partial(gmm_kernels.grouped_matmul, impl=self.grouped_matmul_impl, interpret=self.interpret)

    def combine(self, y_ND, weights_TK, sent, out_dtype):
        return dispatch_kernels.combine(y_ND, weights_TK, sent.order_N, out_dtype, row_TK=sent.row_TK,
                                        impl=self.dispatch_impl, interpret=self.interpret)

    @property
    def partitionable(self) -> bool:
        """Whether XLA can partition these ops over a sharded mesh itself: the references can; Pallas TPU and Mosaic
        GPU kernels are custom calls that must run per shard, inside a shard_map."""
        return self.dispatch_impl == "reference" and self.grouped_matmul_impl == "reference"


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
