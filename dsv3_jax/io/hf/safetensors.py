"""One safetensors file: its header read into byte ranges (checked against the file's size), one tensor read at a
time, and a file written one tensor at a time. Our own small reader, since safetensors' numpy backend knows neither
bfloat16 nor float8."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

from dsv3_jax.io.hf.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype name, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file_path: str) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check every tensor's byte range against the file's size."""
    name = os.path.basename(file_path)
    size = os.path.getsize(file_path)
    with open(file_path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{name}: truncated safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{name}: truncated safetensors file (header of {header_len} bytes, file {size})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    return {key: _parse_entry(key, info, file_path, data_start, size)
            for key, info in header.items() if key != "__metadata__"}


def _parse_entry(key: str, info: Any, file_path: str, data_start: int, size: int) -> TensorEntry:
    name = os.path.basename(file_path)
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{name}: corrupt safetensors header entry for tensor {key!r}") from None
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{name}: tensor {key!r} has unsupported dtype {dtype}")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if not (0 <= begin <= end) or end - begin != expected:
        raise CheckpointError(f"{name}: corrupt safetensors header: tensor {key!r} spans bytes [{begin}, {end}), "
                              f"but {dtype}{list(shape)} needs {expected}")
    if data_start + end > size:
        raise CheckpointError(f"{name}: truncated safetensors file: tensor {key!r} ends at byte {data_start + end}, "
                              f"the file has {size}")
    return TensorEntry(file_path, dtype, shape, data_start + begin, data_start + end)


def read_tensor(key: str, entry: TensorEntry) -> np.ndarray:
    """Tensor `key` as a numpy array of its stored dtype (bfloat16 and float8 via ml_dtypes)."""
    buffer = bytearray(entry.end - entry.start)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        got = f.readinto(buffer)
    if got != len(buffer):
        raise CheckpointError(f"{os.path.basename(entry.file)}: truncated safetensors file while reading tensor "
                              f"{key!r}")
    return np.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)


@dataclasses.dataclass(frozen=True)
class TensorOut:
    """A tensor to write: its name, shape, numpy dtype and a function that produces it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: str, tensors: list[TensorOut]) -> None:
    """Write one safetensors file, producing and writing one tensor at a time (largest itemsize first)."""
    ordered = sorted(tensors, key=lambda t: -t.dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in ordered:
        header[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in ordered:
            array = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if array.shape != t.shape:
                raise CheckpointError(f"{os.path.basename(path)}: tensor {t.name!r} came out {array.shape}, "
                                      f"not {t.shape}")
            f.write(array.tobytes())
