"""Up-front checks of an HF checkpoint against a config's slot plan: every tensor's name, shape and dtype, and each
FP8 weight's scales, before anything large is read, each failure a one-line `CheckpointError` naming tensor and file.
(Truncated or corrupt files fail earlier, when `CheckpointTensors` reads their headers.)"""

from __future__ import annotations

from dsv3_jax.io.hf.errors import CheckpointError
from dsv3_jax.io.hf.fp8 import SCALE_SUFFIX
from dsv3_jax.io.hf.names import Slot, hf_shape, slot_shape
from dsv3_jax.io.hf.safetensors import FLOAT_DTYPES, FP8_DTYPES, TensorEntry
from dsv3_jax.io.hf.shards import CheckpointTensors


def check_tensors(plan: list[Slot], tensors: CheckpointTensors, specs: dict, block: tuple[int, int]) -> None:
    """Every tensor the plan needs is there, nothing else is, and each has the shape and dtype it needs."""
    _check_names(plan, tensors)
    _check_shapes(plan, tensors, specs, block)


def _ignorable(key: str) -> bool:
    """Buffers some exporters save that carry no weights."""
    return ".rotary_emb." in key or key.endswith(".inv_freq")


def _check_names(plan: list[Slot], tensors: CheckpointTensors) -> None:
    expected = {s.hf_name for s in plan}
    for s in plan:
        if not s.optional and s.hf_name not in tensors.entries:
            raise CheckpointError(f"{tensors.label}: tensor {s.hf_name!r} is missing from the checkpoint")
    for key in tensors.entries:
        base = key[: -len(SCALE_SUFFIX)] if key.endswith(SCALE_SUFFIX) else key
        if base not in expected and not _ignorable(key):
            raise CheckpointError(f"{tensors.file_of(key)}: unexpected tensor {key!r} (not in this config's layout)")


def _check_shapes(plan: list[Slot], tensors: CheckpointTensors, specs: dict, block: tuple[int, int]) -> None:
    """Shapes and dtypes of every tensor (and FP8 scale), before anything large is built."""
    for s in plan:
        entry = tensors.entries.get(s.hf_name)
        if entry is None:
            continue
        where = f"{tensors.file_of(s.hf_name)}: tensor {s.hf_name!r}"
        want = hf_shape(s.kind, slot_shape(s, specs))
        if entry.shape != want:
            raise CheckpointError(f"{where} has shape {list(entry.shape)}, expected {list(want)}")
        _check_dtype(s.hf_name, entry, tensors, block, where)


def _check_dtype(key: str, entry: TensorEntry, tensors: CheckpointTensors, block: tuple[int, int], where: str) -> None:
    scale = tensors.entries.get(key + SCALE_SUFFIX)
    if entry.dtype in FP8_DTYPES:
        if scale is None:
            raise CheckpointError(f"{where} is {entry.dtype} but has no sibling {key + SCALE_SUFFIX!r}")
        if len(entry.shape) != 2:
            raise CheckpointError(f"{where} is {entry.dtype}: only 2-D weights can be block-quantized")
    elif entry.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where} has dtype {entry.dtype}, expected a floating-point type")
    if scale is None:
        return
    scale_where = f"{tensors.file_of(key + SCALE_SUFFIX)}: tensor {key + SCALE_SUFFIX!r}"
    if entry.dtype not in FP8_DTYPES:
        raise CheckpointError(f"{scale_where} scales a {entry.dtype} weight; only float8 weights carry scales")
    want = tuple(-(-n // b) for n, b in zip(entry.shape, block))
    if scale.shape != want or scale.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{scale_where} is {scale.dtype}{list(scale.shape)}, expected a float tensor of "
                              f"shape {list(want)} (blocks of {block[0]}x{block[1]})")
