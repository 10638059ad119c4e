"""All-to-all over one mesh axis as a Pallas TPU kernel: every device DMAs block j of its input straight into
slot `me` of device j's output (remote DMA, HBM to HBM), then waits for its own n − 1 incoming blocks.
"""

from __future__ import annotations

import functools

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import jax_compat
from pallas_kernels.all_to_all.blocks import block_all_to_all, check_axes, unchecked
from pallas_kernels.cost import cost_estimate, nbytes


def _kernel(x_hbm, out_hbm, local_sem, send_sems, recv_sems, *, axis_name: str, n: int):
    """A barrier semaphore first makes sure every peer has entered the kernel, so no DMA lands in an output buffer
    its owner is not done with. Each peer distance s = 1 … n−1 has its own send and receive DMA semaphore: device me
    sends to me + s and receives from me − s on semaphore s, so each wait counts exactly one block. Sends are issued
    in that staggered order, so at every step the n devices target n different peers."""
    me = lax.axis_index(axis_name)
    peer = lambda s: lax.rem(me + s, n)

    barrier = pltpu.get_barrier_semaphore()
    for s in range(1, n):
        pl.semaphore_signal(barrier, 1, device_id={axis_name: peer(s)}, device_id_type=pl.DeviceIdType.MESH)
    pl.semaphore_wait(barrier, n - 1)

    local = pltpu.make_async_copy(x_hbm.at[me], out_hbm.at[me], local_sem)
    local.start()
    remote = []
    for s in range(1, n):
        copy = pltpu.make_async_remote_copy(x_hbm.at[peer(s)], out_hbm.at[me], send_sems.at[s - 1],
                                            recv_sems.at[s - 1], device_id={axis_name: peer(s)},
                                            device_id_type=pl.DeviceIdType.MESH)
        copy.start()
        remote.append(copy)
    local.wait()
    for copy in remote:
        copy.wait()   # my block to me + s has left, and the block from me − s has arrived


def _varying(x, axis_name: str):
    """x typed as varying over `axis_name` too, and the kernel's output type: the same."""
    x = jax_compat.cast_varying(x, {axis_name})
    return x, jax_compat.typed_struct(x.shape, x.dtype, jax_compat.varying_axes(x))


def _exchange_blocks(x_PX, *, axis_name: str, interpret):
    """out[j] = block `me` of device j's x_PX ([n, ...] with n = the axis size)."""
    # Under the check-free trace, TPU interpret mode's device simulator still wants the operand typed as varying.
    return unchecked(functools.partial(_exchange_kernel, axis_name=axis_name, interpret=interpret), x_PX, axis_name,
                     x_PX.shape[0])


def _exchange_kernel(x_PX, *, axis_name: str, interpret):
    n = x_PX.shape[0]
    x_PX, out_shape = _varying(x_PX, axis_name)
    sems = pltpu.SemaphoreType.DMA((max(n - 1, 1),))
    return pl.pallas_call(
        functools.partial(_kernel, axis_name=axis_name, n=n),
        out_shape=out_shape,
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[pltpu.SemaphoreType.DMA(()), sems, sems],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        # Every block is read once and written once (HBM to HBM); n - 1 of the n blocks cross to a peer.
        cost_estimate=cost_estimate(flops=0, bytes_accessed=2 * nbytes(x_PX),
                                    remote_bytes_transferred=nbytes(x_PX) * (n - 1) // n),
        interpret=interpret,
    )(x_PX)


def all_to_all(x, axis_name: str, split_axis: int, concat_axis: int, *, tiled: bool = False, interpret=False):
    """jax.lax.all_to_all(x, axis_name, split_axis, concat_axis, tiled=tiled) by remote DMA, over one axis.
    interpret: False on TPU; True or pltpu.InterpretParams() to simulate the devices on CPU.

    Call inside shard_map (the axis must be manual). Same result as jax.lax.all_to_all (tiled or not); its
    transpose is the all-to-all with split and concat axes swapped."""
    n = lax.axis_size(axis_name)
    split_axis, concat_axis = check_axes(x, n, axis_name, split_axis, concat_axis, tiled)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    exchange = functools.partial(_exchange_blocks, axis_name=axis_name, interpret=interpret)
    return block_all_to_all(exchange, x, n, split_axis, concat_axis, tiled)
