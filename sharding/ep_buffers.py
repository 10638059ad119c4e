"""Receive-buffer sizes of the expert-parallel exchange, next to the balanced and the worst-case sizes."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from sharding.ep_layout import check_expert_parallel


def capacity_per_peer(rows_per_rank: int, ep: int, capacity_factor: float, block_multiple: int = 8) -> int:
    """C: rows one rank may send to one peer in one round, ceil(capacity_factor · T_local·K / EP) rounded up to
    `block_multiple`. Per round each rank so receives at most EP·C rows, where a buffer sized for the worst case
    (every rank sends all its rows that can reach one rank to that rank) needs T_local·K·min(EP, E/K) rows."""
    rows = max(1, math.ceil(capacity_factor * rows_per_rank / ep))
    return -(-rows // block_multiple) * block_multiple


@dataclasses.dataclass(frozen=True)
class EPBuffers:
    tokens_per_rank: int
    top_k: int
    ep: int
    capacity_per_peer: int   # C
    balanced_rows: int       # T_local·K: what each rank receives when routing is perfectly balanced
    buffer_rows: int         # EP·C: the receive buffer of one round
    worst_case_rows: int     # EP·T_local·min(K, E/EP): a single-shot dropless receive buffer
    row_bytes: int           # D · itemsize

    @property
    def buffer_bytes(self) -> int:
        return self.buffer_rows * self.row_bytes

    @property
    def balanced_bytes(self) -> int:
        return self.balanced_rows * self.row_bytes

    @property
    def worst_case_bytes(self) -> int:
        return self.worst_case_rows * self.row_bytes

    def rounds_for(self, max_rows_to_one_peer: int) -> int:
        """Rounds needed when the busiest (sender, receiver) pair carries this many rows."""
        return max(1, -(-int(max_rows_to_one_peer) // self.capacity_per_peer))


def ep_buffer_size(tokens_per_rank: int, top_k: int, n_experts: int, ep: int, *, capacity_factor: float = 1.25,
                   block_multiple: int = 8, d_model: int = 0, dtype="bfloat16") -> EPBuffers:
    """Rows (and bytes, for rows of `d_model` elements of `dtype`) of one rank's per-round receive buffer."""
    check_expert_parallel(n_experts, ep, capacity_factor=capacity_factor)
    rows = tokens_per_rank * top_k
    c = capacity_per_peer(rows, ep, capacity_factor, block_multiple)
    worst = ep * tokens_per_rank * min(top_k, n_experts // ep)
    return EPBuffers(tokens_per_rank, top_k, ep, c, rows, ep * c, worst, d_model * jnp.dtype(dtype).itemsize)
