"""Packed rows: segment ids number a row's documents 1, 2, ... and 0 marks padding. `same_segment` says which positions
may use the token `offset` places later: the losses' valid targets, and the tokens the routers' statistics count.
"""

from __future__ import annotations

import jax.numpy as jnp


def same_segment(segment_ids_BT, offset: int, shape: tuple[int, int]):
    """bool [B, T]: True at position i when i + offset lies in the row and, with segment ids, in i's segment, which
    is not padding. offset 0: every non-padding position (every position without segment ids)."""
    B, T = shape
    valid_BT = jnp.broadcast_to(jnp.arange(T)[None, :] < T - offset, (B, T))
    if segment_ids_BT is not None:
        later_BT = jnp.pad(segment_ids_BT[:, offset:], ((0, 0), (0, offset)))
        valid_BT = valid_BT & (later_BT == segment_ids_BT) & (segment_ids_BT != 0)
    return valid_BT
