"""A checkpoint directory's weight files: one model.safetensors, or shards listed by model.safetensors.index.json.
Reading opens every header up front (a tensor in two files, or not where the index says, is an error); writing
splits the tensors into shards of bounded size."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from dsv3_jax.io.hf.errors import CheckpointError
from dsv3_jax.io.hf.safetensors import TensorEntry, TensorOut, read_header, read_tensor, write_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class CheckpointTensors:
    """The tensors of a checkpoint directory (one file, or shards listed by an index), read one at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files, self.label = _checkpoint_files(directory)
        self.entries: dict[str, TensorEntry] = {}
        for file_path in self.files:
            for key, entry in read_header(file_path).items():
                if key in self.entries:
                    raise CheckpointError(f"{os.path.basename(file_path)}: tensor {key!r} also appears in "
                                          f"{os.path.basename(self.entries[key].file)}")
                self.entries[key] = entry
        self._check_index()

    def _check_index(self) -> None:
        """With an index, every tensor it lists must be in the shard it names (and no shard adds others)."""
        if self.label != INDEX_FILE:
            return
        weight_map = _read_index(os.path.join(self.directory, INDEX_FILE))
        for key, file_name in weight_map.items():
            entry = self.entries.get(key)
            if entry is None or os.path.basename(entry.file) != file_name:
                raise CheckpointError(f"{file_name}: tensor {key!r} is listed in {INDEX_FILE} but not in this file")
        for key, entry in self.entries.items():
            if key not in weight_map:
                raise CheckpointError(f"{os.path.basename(entry.file)}: tensor {key!r} is not listed in {INDEX_FILE}")

    def file_of(self, key: str) -> str:
        return os.path.basename(self.entries[key].file)

    def read(self, key: str) -> np.ndarray:
        """One tensor as a numpy array of its stored dtype (bfloat16 and float8 via ml_dtypes)."""
        return read_tensor(key, self.entries[key])


def _read_index(index_path: str) -> dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{INDEX_FILE}: unreadable index ({e.__class__.__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{INDEX_FILE}: unreadable index (weight_map is not an object)")
    return weight_map


def _checkpoint_files(directory: str) -> tuple[list[str], str]:
    """The safetensors files of `directory` and the name to quote for tensors that are missing."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        names = sorted(set(_read_index(index_path).values()))
        paths = [os.path.join(directory, n) for n in names]
        for path in paths:
            if not os.path.isfile(path):
                raise CheckpointError(f"{os.path.basename(path)}: shard listed in {INDEX_FILE} does not exist")
        return paths, INDEX_FILE
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], SINGLE_FILE
    paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not paths:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file")
    return paths, ", ".join(os.path.basename(p) for p in paths)


def write_weights(directory: str, tensors: list[TensorOut], max_shard_bytes: int) -> None:
    """`tensors` as one model.safetensors, or as shards of at most `max_shard_bytes` (a bigger tensor gets one of
    its own) plus the index."""
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, SINGLE_FILE), shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shard)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def _shard(tensors: list[TensorOut], max_shard_bytes: int) -> list[list[TensorOut]]:
    """Greedy split into consecutive shards of at most `max_shard_bytes` (a bigger single tensor gets its own)."""
    shards: list[list[TensorOut]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def remove_weights(directory: str) -> None:
    """Earlier saves' weights in `directory` (they would mix with new ones on load)."""
    stale = glob.glob(os.path.join(directory, "model-*-of-*.safetensors"))
    stale += [os.path.join(directory, n) for n in (SINGLE_FILE, INDEX_FILE)]
    for file_path in stale:
        if os.path.isfile(file_path):
            os.remove(file_path)
