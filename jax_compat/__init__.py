"""The one package that touches private or version-dependent JAX and orbax APIs; everything else calls it. It sits below
all three floors (only jax at import time; each private module when its entry is first used), and each entry of
`ENTRIES` raises `PrivateAPIError`, naming the API and the installed versions, when an upgrade moves what it uses.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
from typing import Callable

import jax
import numpy as np
from jax import lax


class PrivateAPIError(RuntimeError):
    """A private or version-dependent API this repository relies on is missing or has changed."""


def versions() -> str:
    try:
        orbax = importlib.metadata.version("orbax-checkpoint")
    except importlib.metadata.PackageNotFoundError:
        orbax = "not installed"
    return f"JAX {jax.__version__}, orbax-checkpoint {orbax}"


def _moved(api: str, problem: str) -> PrivateAPIError:
    return PrivateAPIError(f"{api}: {problem} in {versions()}; update jax_compat for this version")


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _moved(module, f"cannot be imported ({e})") from None


def _attribute(owner, name: str, api: str):
    value = getattr(owner, name, None)
    if value is None:
        raise _moved(api, "is missing")
    return value


def _require_parameters(function: Callable, names: tuple[str, ...], api: str) -> None:
    """Raise unless `function` takes every one of `names` as a parameter (by name)."""
    have = inspect.signature(function).parameters
    missing = [n for n in names if n not in have]
    if missing:
        raise _moved(api, f"no longer takes {', '.join(missing)} (takes {', '.join(have)})")


# ==== manual_axes: typing under shard_map's check_vma =================================================

_AXES_API = "jax.typeof(x).manual_axis_type.varying"


def varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over (empty outside a shard_map)."""
    aval = jax.typeof(x)
    axis_type = getattr(aval, "manual_axis_type", None)
    if axis_type is not None:
        return frozenset(axis_type.varying)
    if hasattr(aval, "vma"):   # JAX before 0.10
        return frozenset(aval.vma)
    raise _moved(_AXES_API, f"is missing (the aval is a {type(aval).__name__} without manual_axis_type or vma)")


def cast_varying(x, axes):
    """x typed as varying over the manual axes `axes` too (a type cast: nothing moves between devices)."""
    missing = tuple(sorted(frozenset(axes) - varying_axes(x)))
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return _attribute(lax, "pvary", "jax.lax.pcast")(x, missing)


def typed_struct(shape, dtype, axes) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct (a kernel's out_shape) typed as varying over the manual axes `axes`."""
    if hasattr(jax.sharding, "ManualAxisType"):
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=frozenset(axes)))
    return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset(axes))


def _probe_manual_axes() -> None:
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((1,), ("compat",), devices=jax.devices()[:1])
    seen = {}

    def body(x, y):
        seen["x"], seen["y"], seen["cast"] = varying_axes(x), varying_axes(y), varying_axes(cast_varying(y, {"compat"}))
        struct = typed_struct((2,), np.float32, {"compat"})
        axis_type = getattr(struct, "manual_axis_type", None)
        seen["struct"] = frozenset(axis_type.varying if axis_type is not None else getattr(struct, "vma", ()))
        return x

    x = jax.device_put(np.ones(2, np.float32), NamedSharding(mesh, P("compat")))
    y = jax.device_put(np.ones(2, np.float32), NamedSharding(mesh, P()))
    jax.make_jaxpr(jax.shard_map(body, mesh=mesh, in_specs=(P("compat"), P()), out_specs=P("compat")))(x, y)
    want = {"x": {"compat"}, "y": frozenset(), "cast": {"compat"}, "struct": {"compat"}}
    if seen != want:
        raise _moved(_AXES_API, f"types a sharded operand, a replicated one, a cast one and a typed struct as "
                                f"varying over {seen}, not {want}")


# ==== cudnn_attention ================================================================================

_CUDNN_MODULE = "jax._src.cudnn.fused_attention_stablehlo"
_CUDNN_PARAMETERS = ("query", "key", "value", "mask", "scale", "mask_type", "qkv_layout")


def cudnn_fused_attention():
    """JAX's private cuDNN attention module (its `dot_product_attention` is looked up at each call)."""
    return _import(_CUDNN_MODULE)


def _cudnn_parts():
    """(the module's dot_product_attention, its MaskType.CAUSAL)."""
    module = cudnn_fused_attention()
    mask_type = _attribute(module, "MaskType", f"{_CUDNN_MODULE}.MaskType")
    causal = _attribute(mask_type, "CAUSAL", f"{_CUDNN_MODULE}.MaskType.CAUSAL")
    return _attribute(module, "dot_product_attention", f"{_CUDNN_MODULE}.dot_product_attention"), causal


def cudnn_attention(q_BTHQ, k_BSHQ, v_BSHA, *, scale: float, mask_B1TS):
    """Causal cuDNN flash attention with v's own head dim (GPU only; layout B, T, heads, head dim)."""
    attention, causal = _cudnn_parts()
    return attention(q_BTHQ, k_BSHQ, v_BSHA, mask=mask_B1TS, scale=scale, mask_type=causal, qkv_layout="BTNH")


def _probe_cudnn_attention() -> None:
    attention, _ = _cudnn_parts()
    _require_parameters(attention, _CUDNN_PARAMETERS, f"{_CUDNN_MODULE}.dot_product_attention")


# ==== gpu_interpreter: Mosaic GPU interpret mode and its WGMMA =========================================

_GPU_INTERPRET = "jax._src.pallas.mosaic_gpu.interpret"


@dataclasses.dataclass(frozen=True)
class _Interpreter:
    utils: object            # jax._src.pallas.mosaic.interpret.utils
    callbacks: object        # jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks
    params: type             # InterpretGPUParams
    transpose: type          # jax._src.state.types.TransposeTransform


@functools.cache
def _interpreter() -> _Interpreter:
    return _Interpreter(
        utils=_import("jax._src.pallas.mosaic.interpret.utils"),
        callbacks=_import(f"{_GPU_INTERPRET}.gpu_callbacks"),
        params=_attribute(_import(f"{_GPU_INTERPRET}.params"), "InterpretGPUParams",
                          f"{_GPU_INTERPRET}.params.InterpretGPUParams"),
        transpose=_attribute(_import("jax._src.state.types"), "TransposeTransform",
                             "jax._src.state.types.TransposeTransform"))


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
    it = _interpreter()
    gc = it.callbacks
    device_id, thread_id = int(device_id), int(thread_id)
    shared_memory = gc._get_shared_memory()
    thread = shared_memory.get_global_thread_id(device_id, thread_id)
    info = it.utils.GPULoggingInfo(device_id=device_id, grid_point_coords=tuple(int(x) for x in grid_point_coords),
                                   thread_id=thread_id, source_info=source_info)

    def read(key_array, transforms):
        index_transforms, perm = _split_transposes(gc._remove_noop_transforms(transforms), it.transpose)
        index_transforms = jax.tree.map(int, index_transforms)
        key = gc.HostAllocationKey.from_array(key_array)
        rng = it.utils.to_range(index_transforms)
        value, _, _ = shared_memory.get_buffer_content(key, rng, thread, logging_info=info)
        return (key, rng), (value if perm is None else np.transpose(value, perm))

    _, a = read(a_allocation_key_as_array, a_transforms)
    _, b = read(b_allocation_key_as_array, b_transforms)
    (acc_key, acc_range), acc = read(acc_allocation_key_as_array, acc_transforms)
    result = acc + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
    shared_memory.store_buffer_content(acc_key, acc_range, result, thread, logging_info=info)
    return token


@functools.cache
def install_gpu_wgmma() -> None:
    """Put our WGMMA callback (transposed operands too) in place of the GPU interpreter's (once per process)."""
    _interpreter().callbacks.wgmma = _wgmma_with_transposes


def gpu_interpret_params(**kwargs):
    """InterpretGPUParams that run a Mosaic GPU kernel in JAX's GPU interpreter on CPU, transposed WGMMA operands
    included."""
    install_gpu_wgmma()
    return _interpreter().params(**kwargs)


def reset_gpu_interpreter() -> None:
    """Forget the GPU interpreter's global state (what a failed interpreted kernel leaves behind)."""
    name = "reset_gpu_interpret_mode_state"
    _attribute(_interpreter().callbacks, name, f"{_GPU_INTERPRET}.gpu_callbacks.{name}")()


def _probe_gpu_interpreter() -> None:
    it = _interpreter()
    where = f"{_GPU_INTERPRET}.gpu_callbacks"
    for name in ("_get_shared_memory", "_remove_noop_transforms", "HostAllocationKey"):
        _attribute(it.callbacks, name, f"{where}.{name}")
    reset_gpu_interpreter()   # a no-op between kernels, and it must still exist
    _attribute(it.callbacks.HostAllocationKey, "from_array", f"{where}.HostAllocationKey.from_array")
    for name in ("GPULoggingInfo", "to_range"):
        _attribute(it.utils, name, f"jax._src.pallas.mosaic.interpret.utils.{name}")
    if "permutation" not in {f.name for f in dataclasses.fields(it.transpose)}:
        raise _moved("jax._src.state.types.TransposeTransform.permutation", "is missing")
    jax_wgmma = getattr(it.callbacks, "wgmma", None)
    if jax_wgmma is None:
        raise _moved(f"{where}.wgmma", "is missing")
    ours = tuple(inspect.signature(_wgmma_with_transposes).parameters)
    if jax_wgmma is not _wgmma_with_transposes and tuple(inspect.signature(jax_wgmma).parameters) != ours:
        raise _moved(f"{where}.wgmma", f"takes ({', '.join(inspect.signature(jax_wgmma).parameters)}), our "
                                       f"replacement ({', '.join(ours)})")
    # The replacement only takes effect while the interpreter looks the callback up on the module at each call.
    caller = _import(f"{_GPU_INTERPRET}.jaxpr_interpret")
    if "gpu_callbacks.wgmma" not in inspect.getsource(caller):
        raise _moved(f"{_GPU_INTERPRET}.jaxpr_interpret", "no longer calls gpu_callbacks.wgmma through the module")
    memory = _import(f"{_GPU_INTERPRET}.shared_memory")
    shared = _attribute(memory, "GPUSharedMemory", f"{_GPU_INTERPRET}.shared_memory.GPUSharedMemory")
    for name in ("get_global_thread_id", "get_buffer_content", "store_buffer_content"):
        _attribute(shared, name, f"{_GPU_INTERPRET}.shared_memory.GPUSharedMemory.{name}")
    for name in ("get_buffer_content", "store_buffer_content"):
        _require_parameters(getattr(shared, name), ("logging_info",), f"GPUSharedMemory.{name}")


# ==== orbax_lazy_leaves: leaves built only when orbax writes them ======================================

_ORBAX_FUTURE = "orbax.checkpoint._src.futures.future"
_ORBAX_HANDLER = "orbax.checkpoint.type_handlers.NumpyHandler"


def register_lazy_leaf_handler(leaf_type: type) -> None:
    """Teach orbax's PyTree saving to write `leaf_type` leaves (once per process; other types keep their handlers).

    A leaf has `shape`, `dtype` and `produce()` (the whole array), and `sliced`: when true it is written piece by
    piece from `parts()` ((index, block) pairs), into chunks of `piece_bytes` split along its leading `piece_axes`
    first, never built whole. Leaves are produced one at a time, each after the previous one is written.
    """
    import orbax.checkpoint as ocp

    if not ocp.type_handlers.has_type_handler(leaf_type):
        ocp.type_handlers.register_type_handler(leaf_type, _lazy_handler_class()(leaf_type), override=True)


@functools.cache
def _lazy_handler_class() -> type:
    import orbax.checkpoint as ocp
    import tensorstore as ts

    commit_future = _attribute(_import(_ORBAX_FUTURE), "CommitFutureAwaitingContractedSignals",
                               f"{_ORBAX_FUTURE}.CommitFutureAwaitingContractedSignals")

    class LazyLeafHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self, leaf_type: type):
            super().__init__(deepcopy_host_arrays=False)
            self._leaf_type = leaf_type

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.type_handlers.SaveArgs()] * len(values)
            return [commit_future(self._one_by_one(list(values), list(infos), list(args)), name="lazy_leaves")]

        async def _one_by_one(self, values, infos, args):
            for value, info, arg in zip(values, infos, args):
                if value.sliced:
                    # One chunk per piece, so each piece is an independent write and a reader can fetch one
                    # piece without decompressing others.
                    arg = dataclasses.replace(arg, chunk_byte_size=value.piece_bytes,
                                              shard_axes=tuple(range(value.piece_axes)))
                    await self._background_serialize([value], [info], [arg])
                    continue
                array = np.asarray(value.produce(), dtype=value.dtype)
                array = array if array.flags.c_contiguous else array.copy()
                if array.shape != tuple(value.shape):
                    raise RuntimeError(f"internal: {info.name} came out {array.shape}, expected {value.shape}")
                await self._background_serialize([array], [info], [arg])
                del array

        async def _open_and_write(self, value, tspec, ts_context):
            if not isinstance(value, self._leaf_type):
                return await super()._open_and_write(value, tspec, ts_context)
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            for index, block in value.parts():   # unwritten chunks read as the fill value, 0
                await store[index].write(np.ascontiguousarray(block, dtype=value.dtype))

    return LazyLeafHandler


def _probe_orbax_lazy_leaves() -> None:
    import orbax.checkpoint as ocp

    _lazy_handler_class()
    handler = ocp.type_handlers.NumpyHandler
    _require_parameters(handler.__init__, ("deepcopy_host_arrays",), f"{_ORBAX_HANDLER}.__init__")
    for name, parameters in (("_background_serialize", ("values", "infos", "args")),
                             ("_open_and_write", ("value", "tspec", "ts_context"))):
        api = f"{_ORBAX_HANDLER}.{name}"
        _require_parameters(_attribute(handler, name, api), parameters, api)
    # Piece-by-piece writes need _background_serialize to reach each value through self._open_and_write.
    if "self._open_and_write(" not in inspect.getsource(handler._background_serialize):
        raise _moved(f"{_ORBAX_HANDLER}._background_serialize", "no longer writes each value through _open_and_write")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One private API this package leans on, and the probe that checks it; tests/jax_compat/ runs one test per entry
    and fails with the probe's message when an upgrade moves or changes the API. The entries (ENTRIES):

      manual_axes        a value's manual-axis typing under `jax.shard_map(check_vma=True)`: the aval's
                         `.manual_axis_type.varying` (JAX 0.10+; `.vma` before), `lax.pcast` (`lax.pvary` before),
                         `ShapeDtypeStruct(manual_axis_type=...)`
      cudnn_attention    `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`: cuDNN flash attention with
                         v's head dim unequal to q/k's, which `jax.nn.dot_product_attention` does not take
      gpu_interpreter    `jax._src.pallas.mosaic_gpu.interpret`: Mosaic GPU interpret mode, with our WGMMA callback in
                         place of JAX's (which cannot read operands through a trailing `plgpu.transpose_ref`)
      orbax_lazy_leaves  `orbax.checkpoint._src.futures` and the private `NumpyHandler._background_serialize` /
                         `_open_and_write`: a type handler that builds each leaf only when orbax writes it
    """

    api: str                 # what it leans on
    probe: Callable[[], None]   # raises PrivateAPIError when that has moved or changed


ENTRIES = {
    "manual_axes": Entry(_AXES_API, _probe_manual_axes),
    "cudnn_attention": Entry(f"{_CUDNN_MODULE}.dot_product_attention", _probe_cudnn_attention),
    "gpu_interpreter": Entry(f"{_GPU_INTERPRET} (WGMMA callback)", _probe_gpu_interpreter),
    "orbax_lazy_leaves": Entry(f"{_ORBAX_FUTURE}, {_ORBAX_HANDLER}._background_serialize / _open_and_write",
                               _probe_orbax_lazy_leaves),
}
