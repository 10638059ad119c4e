"""Saving our variables as an HF checkpoint directory (config.json plus safetensors, one file or shards with an
index) that `transformers` loads: one HF tensor produced and written at a time, into a staging folder that replaces
the directory's earlier weights only once everything is written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import flax.linen as nn
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.io.hf.errors import CheckpointError
from dsv3_jax.io.hf.leaves import get_leaf, leaf_specs
from dsv3_jax.io.hf.names import Slot, hf_shape, plan_slots, slot_shape, to_hf
from dsv3_jax.io.hf.safetensors import TensorOut
from dsv3_jax.io.hf.shards import DEFAULT_MAX_SHARD_BYTES, remove_weights, write_weights
from dsv3_jax.model.moe.router import BIAS_COLLECTION


def save_pretrained(config: ModelConfig, variables: dict, path: str | os.PathLike,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json and HF-layout safetensors (per-expert names, MTP as layer n_layers + d)."""
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    variables = nn.meta.unbox(variables)
    specs = leaf_specs(config)
    _check_variables(variables, specs)
    _warn_if_transformers_differs(config)
    tensors = [_output(s, variables, specs, config) for s in plan_slots(config) if _should_write(s, variables, config)]
    # Everything is written into a staging folder first: a save that fails half-way leaves the
    # directory's earlier checkpoint as it was.
    staging = tempfile.mkdtemp(prefix=".saving-", dir=directory)
    try:
        write_weights(staging, tensors, max_shard_bytes)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2, sort_keys=True)
            f.write("\n")
        remove_weights(directory)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_variables(variables: dict, specs: dict) -> None:
    for leaf, spec in specs.items():
        try:
            value = get_leaf(variables, leaf)
        except (KeyError, TypeError):
            raise CheckpointError(f"variables: {'/'.join(leaf)} is missing "
                                  f"(the config expects {list(spec.shape)})") from None
        if tuple(value.shape) != tuple(spec.shape):
            raise CheckpointError(f"variables: {'/'.join(leaf)} has shape {list(value.shape)}, "
                                  f"the config expects {list(spec.shape)}")


def _warn_if_transformers_differs(config: ModelConfig) -> None:
    """Routing choices that transformers' DeepseekV2/V3 classes cannot express (the file is still written)."""
    c, problems = config, []
    if c.scoring_func == "softmax" and c.norm_topk_prob:
        problems.append("DeepseekV2 never renormalises top-k weights (norm_topk_prob reads back as False)")
    if c.scoring_func == "softmax" and c.topk_method == "noaux_tc":
        problems.append("DeepseekV2 has no noaux_tc group scoring")
    if c.scoring_func == "sigmoid" and c.topk_method != "noaux_tc" and c.n_group > 1:
        problems.append(f"DeepseekV3 always scores groups as noaux_tc, not {c.topk_method}")
    if problems:
        warnings.warn("transformers will not compute this model exactly: " + "; ".join(problems), stacklevel=3)


def _should_write(slot: Slot, variables: dict, config: ModelConfig) -> bool:
    """Correction biases go out for V3 (sigmoid) models, and for V2 ones only when they are not all zero."""
    if slot.leaf[0] != BIAS_COLLECTION or config.scoring_func == "sigmoid":
        return True
    return bool(np.any(np.asarray(get_leaf(variables, slot.leaf)[slot.index]) != 0))


def _output(slot: Slot, variables: dict, specs: dict, config: ModelConfig) -> TensorOut:
    dtype = np.dtype(np.float32) if slot.leaf[0] == BIAS_COLLECTION else np.dtype(config.jnp_param_dtype)
    produce = lambda: to_hf(slot.kind, np.asarray(get_leaf(variables, slot.leaf)[slot.index])).astype(dtype)
    return TensorOut(slot.hf_name, hf_shape(slot.kind, slot_shape(slot, specs)), dtype, produce)
