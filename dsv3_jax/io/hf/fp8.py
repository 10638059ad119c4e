"""DeepSeek's FP8 weights in an HF checkpoint: float8 `<name>.weight` with a `<name>.weight_scale_inv` sibling, one
scale per block of config.json's `quantization_config.weight_block_size` (128x128 unless it says otherwise),
dequantized to float32 as they are read."""

from __future__ import annotations

from typing import Any

import numpy as np

from dsv3_jax.io.hf.safetensors import FP8_DTYPES
from dsv3_jax.io.hf.shards import CheckpointTensors
from pallas_kernels.fp8.quantize import dequantize

SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)


def fp8_block(raw_config: dict[str, Any]) -> tuple[int, int]:
    """The (rows, cols) block each FP8 scale covers, from config.json."""
    block = (raw_config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_FP8_BLOCK
    return int(block[0]), int(block[1])


def read_real(tensors: CheckpointTensors, key: str, block: tuple[int, int]) -> np.ndarray:
    """Tensor `key` as stored, or as float32 values if it is float8 (times its block scales)."""
    array = tensors.read(key)
    if tensors.entries[key].dtype in FP8_DTYPES:
        array = dequantize(array, tensors.read(key + SCALE_SUFFIX), block)
    return array
