"""Loading an HF checkpoint directory: config.json and every safetensors header read and checked first
(`open_checked`), then our variables built one leaf at a time, each HF tensor read as its leaf is filled.
The model computes in the checkpoint's own dtype unless the caller names one (`checkpoint_dtype`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.io.hf.checks import check_tensors
from dsv3_jax.io.hf.errors import CheckpointError
from dsv3_jax.io.hf.fp8 import SCALE_SUFFIX, fp8_block, read_real
from dsv3_jax.io.hf.leaves import leaf_specs, set_leaf
from dsv3_jax.io.hf.names import Slot, group_by_leaf, plan_slots, to_ours
from dsv3_jax.io.hf.safetensors import TensorEntry
from dsv3_jax.io.hf.shards import CheckpointTensors

AUTO_DTYPE = "auto"   # load_pretrained's default: compute in the checkpoint's own dtype
_COMPUTE_DTYPES = {"F64": "float32", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                   "F8_E4M3": "bfloat16", "F8_E5M2": "bfloat16"}   # stored dtype -> ModelConfig.dtype


def load_pretrained(path: str | os.PathLike, dtype: str = AUTO_DTYPE,
                    param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Read an HF DeepSeek-V2/V3 checkpoint directory into (ModelConfig, {'params', 'moe_bias'}).

    `dtype` is the compute dtype (`ModelConfig.dtype`): "auto" (or None) takes the checkpoint's own, as
    transformers' `dtype="auto"` does (see `checkpoint_dtype`); "float32", "bfloat16" or "float16" override it.
    `param_dtype` (default: ModelConfig's, float32) is the dtype the weights are held in.
    """
    checked = open_checked(path, AUTO_DTYPE if dtype is None else dtype, param_dtype)
    variables: dict = {}
    for leaf, slots in checked.slots_by_leaf().items():
        set_leaf(variables, leaf, jnp.asarray(build_leaf(slots, checked.tensors, checked.specs[leaf], checked.block)))
    return checked.config, variables


@dataclasses.dataclass(frozen=True)
class CheckedCheckpoint:
    """An HF checkpoint directory whose config.json and tensor headers passed every check; no tensor read yet."""

    config: ModelConfig
    tensors: CheckpointTensors
    plan: list[Slot]                   # every HF tensor of `config`, in HF order
    specs: dict                        # leaf -> shape and dtype of our variable (leaves.leaf_specs)
    block: tuple[int, int]             # the block each FP8 scale covers

    def slots_by_leaf(self) -> dict[tuple[str, ...], list[Slot]]:
        return group_by_leaf(self.plan, self.specs)


def open_checked(path: str | os.PathLike, dtype: str | None = None,
                 param_dtype: str | None = None) -> CheckedCheckpoint:
    """Read config.json and every safetensors header of `path` and check every tensor's name, shape and dtype
    against the config, so that a bad checkpoint fails before anything large is read or written. `dtype` and
    `param_dtype` are ModelConfig's (None: its defaults); `dtype` AUTO_DTYPE is the checkpoint's own."""
    directory = os.fspath(path)
    raw_config = _read_raw_config(directory)
    explicit = None if dtype == AUTO_DTYPE else dtype
    changes = {k: v for k, v in (("dtype", explicit), ("param_dtype", param_dtype)) if v is not None}
    config = ModelConfig.from_hf(raw_config, **changes)
    tensors = CheckpointTensors(directory)
    if dtype == AUTO_DTYPE:
        config = config.replace(dtype=checkpoint_dtype(raw_config, tensors.entries))
    config = _drop_absent_mtp(config, tensors)
    plan = plan_slots(config, lambda prefix: f"{prefix}mlp.experts.gate_up_proj" in tensors.entries)
    specs = leaf_specs(config)
    block = fp8_block(raw_config)
    check_tensors(plan, tensors, specs, block)
    return CheckedCheckpoint(config, tensors, plan, specs, block)


def checkpoint_dtype(raw_config: dict[str, Any], entries: dict[str, TensorEntry]) -> str:
    """The dtype a checkpoint computes in: config.json's `dtype` (or its older name `torch_dtype`) when it names
    float32, bfloat16 or float16; else the floating-point dtype that holds most of the weights' elements, FP8 ones
    counting as bfloat16 and float64 ones as float32 (FP8 scales are not counted)."""
    for key in ("dtype", "torch_dtype"):
        named = str(raw_config.get(key) or "").removeprefix("torch.")
        if named in _COMPUTE_DTYPES.values():
            return named
    elements: dict[str, int] = {}
    for key, entry in entries.items():
        if entry.dtype in _COMPUTE_DTYPES and not key.endswith(SCALE_SUFFIX):
            name = _COMPUTE_DTYPES[entry.dtype]
            elements[name] = elements.get(name, 0) + math.prod(entry.shape)
    return max(elements, key=elements.get) if elements else "float32"


def _read_raw_config(directory: str) -> dict[str, Any]:
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            return json.load(f)
    except OSError as e:
        raise CheckpointError(f"config.json: cannot read {config_path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"config.json: not valid JSON ({e})") from None


def _drop_absent_mtp(config: ModelConfig, tensors: CheckpointTensors) -> ModelConfig:
    """A config with MTP modules but a checkpoint without any (HF drops them on save): drop MTP, warn once."""
    if config.num_mtp_modules == 0:
        return config
    prefixes = tuple(f"model.layers.{config.n_layers + d}." for d in range(config.num_mtp_modules))
    if any(key.startswith(prefixes) for key in tensors.entries):
        return config
    # stacklevel 4 points past open_checked and load_pretrained (or convert's reader) at the code that asked.
    warnings.warn(f"config.json asks for {config.num_mtp_modules} MTP module(s) (num_nextn_predict_layers) but "
                  f"{tensors.label} holds no model.layers.{config.n_layers}.* tensors; loading without MTP",
                  stacklevel=4)
    return config.replace(num_mtp_modules=0)


def leaf_pieces(slots: list[Slot], tensors: CheckpointTensors,
                block: tuple[int, int]) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(index, values) of each HF tensor of one leaf, read (and FP8 dequantized) as it is asked for; a tensor the
    checkpoint lacks (an optional one) yields nothing, leaving its part of the leaf zero."""
    for s in slots:
        if s.hf_name in tensors.entries:
            yield s.index, to_ours(s.kind, read_real(tensors, s.hf_name, block))


def build_leaf(slots: list[Slot], tensors: CheckpointTensors, spec: jax.ShapeDtypeStruct,
               block: tuple[int, int]) -> np.ndarray:
    """One of our variables, whole, on the host: each HF tensor read as it is copied in."""
    array = np.zeros(spec.shape, dtype=np.dtype(spec.dtype))
    for index, value in leaf_pieces(slots, tensors, block):
        array[index] = value
    return array
