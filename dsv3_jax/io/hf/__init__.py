"""Hugging Face checkpoints: `load_pretrained(path)` reads DeepSeek-V2/V3 safetensors (float32, BF16 or FP8) into
(ModelConfig, variables); `save_pretrained(config, variables, path)` writes the layout `transformers` loads. The other
public names are the steps `dsv3_jax.io.convert` builds its leaf-by-leaf conversion from."""

from dsv3_jax.io.hf.errors import CheckpointError
from dsv3_jax.io.hf.fp8 import DEFAULT_FP8_BLOCK, SCALE_SUFFIX
from dsv3_jax.io.hf.leaves import flatten, get_leaf, leaf_specs, set_leaf
from dsv3_jax.io.hf.load import (AUTO_DTYPE, CheckedCheckpoint, build_leaf, checkpoint_dtype, leaf_pieces,
                                 load_pretrained, open_checked)
from dsv3_jax.io.hf.safetensors import SAFETENSORS_DTYPES
from dsv3_jax.io.hf.save import save_pretrained
from dsv3_jax.io.hf.shards import DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, CheckpointTensors

__all__ = [
    "AUTO_DTYPE", "CheckedCheckpoint", "CheckpointError", "CheckpointTensors", "DEFAULT_FP8_BLOCK",
    "DEFAULT_MAX_SHARD_BYTES", "INDEX_FILE", "SAFETENSORS_DTYPES", "SCALE_SUFFIX", "SINGLE_FILE", "build_leaf",
    "checkpoint_dtype", "flatten", "get_leaf", "leaf_pieces", "leaf_specs", "load_pretrained", "open_checked",
    "save_pretrained", "set_leaf",
]
