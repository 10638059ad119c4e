"""A plain reference of lax.ragged_all_to_all built from all_gather, for platforms that cannot compile it: a test
oracle for the ragged exchange path on XLA:CPU, not a transport (it costs EP× the memory).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """lax.ragged_all_to_all's contract (call inside shard_map): sender s writes
    operand_s[input_offsets_s[d] : + send_sizes_s[d]] into receiver d's output at output_offsets_s[d]. It gathers
    every rank's operand, so it costs EP× the memory."""
    del recv_sizes   # implied by the senders' send_sizes
    me = lax.axis_index(axis_name)
    operand_PNX = lax.all_gather(operand, axis_name)
    offsets_P, sizes_P, dest_P = (lax.all_gather(a, axis_name)[:, me]
                                  for a in (input_offsets, send_sizes, output_offsets))
    rows_N = jnp.arange(min(operand.shape[0], output.shape[0]))
    src_PN = jnp.clip(offsets_P[:, None] + rows_N, 0, operand.shape[0] - 1)
    dest_PN = jnp.where(rows_N < sizes_P[:, None], dest_P[:, None] + rows_N, output.shape[0])
    sent_PNX = operand_PNX[jnp.arange(operand_PNX.shape[0])[:, None], src_PN]
    return output.at[dest_PN.reshape(-1)].set(sent_PNX.reshape(-1, *operand.shape[1:]).astype(output.dtype),
                                              mode="drop")
