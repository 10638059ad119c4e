"""The routed experts' SwiGLU over rows grouped by expert: what the MoE layer runs with every expert local, and what
it hands the expert-parallel exchange (sharding.expert_parallel) to run on the rows a rank receives."""

from __future__ import annotations

from typing import Callable

import jax


def swiglu_experts(x_ND, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, grouped_matmul: Callable):
    """y_ND: down_e(silu(gate_e x) · up_e x) for every row x, e its group (rows contiguous by group, group_sizes_E
    of them each). grouped_matmul(x_NC, w_ECJ, group_sizes_E) -> y_NJ, e.g. pallas_kernels.grouped_matmul's."""
    gate_NF = grouped_matmul(x_ND, w_gate_EDF, group_sizes_E)
    up_NF = grouped_matmul(x_ND, w_up_EDF, group_sizes_E)
    return grouped_matmul(jax.nn.silu(gate_NF) * up_NF, w_down_EFD, group_sizes_E)
