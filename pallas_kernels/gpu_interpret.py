"""Mosaic GPU interpret mode (run Hopper Pallas kernels on CPU), for tests and for `interpret=True`, with transposed
WGMMA operands, which JAX's own interpreter cannot read (jax_compat patches it in).
"""

from __future__ import annotations

import jax_compat


def interpret_params(**kwargs):
    """Parameters that run a Mosaic GPU kernel in JAX's GPU interpreter on CPU (with transposed WGMMA operands).

    JAX's GPU interpreter simulates SMEM, barriers, TMA copies and WGMMA, but its WGMMA reads operands through index
    ranges only, so a `plgpu.transpose_ref` operand (how contraction-major FP8 / transposed-rhs WGMMAs are written)
    fails there. Interpret mode is a private JAX API: jax_compat installs, once, a WGMMA callback that also applies
    trailing transposes, and raises a clear error when an upgrade moves the interpreter."""
    return jax_compat.gpu_interpret_params(**kwargs)


def resolve_interpret(interpret):
    """A kernel's `interpret` argument as pallas_call wants it: False stays False (compile for the GPU), True or
    an InterpretGPUParams selects the interpreter."""
    if interpret is False or interpret is None:
        return False
    jax_compat.install_gpu_wgmma()
    return interpret_params() if interpret is True else interpret
