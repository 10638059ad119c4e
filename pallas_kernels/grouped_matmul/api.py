"""Entry point for grouped matmul. Implementations by name; only the reference exists so far."""

from __future__ import annotations

from pallas_kernels.grouped_matmul import reference

IMPLEMENTATIONS = {"reference": reference.grouped_matmul}


def grouped_matmul(x_MK, w_GKN, group_sizes_G, *, impl: str = "reference"):
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"grouped_matmul impl={impl!r} unknown; choose one of {sorted(IMPLEMENTATIONS)}") from None
    return fn(x_MK, w_GKN, group_sizes_G)
