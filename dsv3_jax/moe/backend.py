"""Which dispatch / grouped-matmul / combine implementation the MoE layer uses on this platform, and the
mesh (if any) whose `expert` axis the routed experts are split over while a step is traced."""

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


@contextlib.contextmanager
def expert_parallel(mesh):
    """While active, MoE layers traced here exchange tokens over `mesh`'s `expert` axis (when it is > 1)."""
    token = _EXPERT_MESH.set(mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None)
    try:
        yield
    finally:
        _EXPERT_MESH.reset(token)


def expert_parallel_mesh():
    """The mesh set by `expert_parallel`, or None (all experts local)."""
    return _EXPERT_MESH.get()
