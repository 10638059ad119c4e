"""Entry point for dispatch/combine. Implementations by name; only the reference exists so far."""

from __future__ import annotations

from pallas_kernels.dispatch import reference
from pallas_kernels.dispatch.reference import Dispatched

IMPLEMENTATIONS = {"reference": (reference.dispatch, reference.combine)}


def _pick(impl: str):
    try:
        return IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"dispatch impl={impl!r} unknown; choose one of {sorted(IMPLEMENTATIONS)}") from None


def dispatch(x_TD, expert_idx_TK, n_experts: int, *, impl: str = "reference") -> Dispatched:
    return _pick(impl)[0](x_TD, expert_idx_TK, n_experts)


def combine(y_ND, weights_TK, order_N, out_dtype=None, *, impl: str = "reference"):
    return _pick(impl)[1](y_ND, weights_TK, order_N, out_dtype)
