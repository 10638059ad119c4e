"""Mosaic GPU interpret mode (run Hopper Pallas kernels on CPU), for tests and for `interpret=True`.

JAX's GPU interpreter simulates SMEM, barriers, TMA copies and WGMMA, but its WGMMA reads operands through
index ranges only, so a `plgpu.transpose_ref` operand (how K-major FP8 / transposed-rhs WGMMAs are written)
fails there. `interpret_params()` installs, once, a WGMMA callback that also applies trailing transposes, and
returns the interpreter's parameters. Interpret mode is a private JAX API: a clear error says when it is missing.
"""

from __future__ import annotations

import functools

import jax
import numpy as np


def _interpreter_modules():
    try:
        from jax._src.pallas.mosaic.interpret import utils as interpret_utils
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        from jax._src.state.types import TransposeTransform
    except ImportError as e:   # the interpreter moved or is absent in this JAX
        raise RuntimeError(f"Mosaic GPU interpret mode is not available in this JAX ({e}); "
                           "run the GPU kernels on a Hopper GPU or use impl='reference'") from None
    return interpret_utils, gpu_callbacks, InterpretGPUParams, TransposeTransform


def _split_transposes(transforms, transpose_type):
    """(the leading index transforms, the composed permutation of the trailing transposes or None)."""
    transforms = tuple(transforms)
    perm = None
    while transforms and isinstance(transforms[-1], transpose_type):
        p = transforms[-1].permutation
        perm = p if perm is None else tuple(perm[i] for i in p)
        transforms = transforms[:-1]
    return transforms, perm


def _wgmma_with_transposes(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
                           acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
                           b_allocation_key_as_array, b_transforms, source_info=None):
    """acc += op(a) @ op(b), where op applies each operand's trailing transposes (synchronous, like JAX's)."""
    interpret_utils, gc, _, transpose_type = _interpreter_modules()
    device_id, thread_id = int(device_id), int(thread_id)
    shared_memory = gc._get_shared_memory()
    thread = shared_memory.get_global_thread_id(device_id, thread_id)
    info = interpret_utils.GPULoggingInfo(device_id=device_id, grid_point_coords=tuple(int(x) for x in grid_point_coords),
                                          thread_id=thread_id, source_info=source_info)

    def read(key_array, transforms):
        index_transforms, perm = _split_transposes(gc._remove_noop_transforms(transforms), transpose_type)
        index_transforms = jax.tree.map(int, index_transforms)
        key = gc.HostAllocationKey.from_array(key_array)
        rng = interpret_utils.to_range(index_transforms)
        value, _, _ = shared_memory.get_buffer_content(key, rng, thread, logging_info=info)
        return (key, rng), (value if perm is None else np.transpose(value, perm))

    _, a = read(a_allocation_key_as_array, a_transforms)
    _, b = read(b_allocation_key_as_array, b_transforms)
    (acc_key, acc_range), acc = read(acc_allocation_key_as_array, acc_transforms)
    result = acc + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
    shared_memory.store_buffer_content(acc_key, acc_range, result, thread, logging_info=info)
    return token


@functools.cache
def _install() -> None:
    _, gpu_callbacks, _, _ = _interpreter_modules()
    gpu_callbacks.wgmma = _wgmma_with_transposes


def interpret_params(**kwargs):
    """Parameters that run a Mosaic GPU kernel in JAX's GPU interpreter on CPU (with transposed WGMMA operands)."""
    _install()
    return _interpreter_modules()[2](**kwargs)


def resolve_interpret(interpret):
    """A kernel's `interpret` argument as pallas_call wants it: False stays False (compile for the GPU), True or
    an InterpretGPUParams selects the interpreter."""
    if interpret is False or interpret is None:
        return False
    _install()
    return interpret_params() if interpret is True else interpret
