"""Hugging Face checkpoints: load DeepSeek-V2/V3 safetensors into our variables, and write them back.

    config, variables = load_pretrained(path)          # config.json + model.safetensors (or sharded + index)
    save_pretrained(config, variables, path)           # the same layout, loadable by `transformers`

Loading maps HF tensor names onto our tree: Linear weights (out, in) are transposed to kernels (in, out),
per-layer tensors are stacked on the leading `layers` axis of `dense_layers` / `moe_layers`, per-expert
tensors (or transformers' fused `experts.gate_up_proj` / `experts.down_proj`) are stacked into
`experts_gate/up (E, D, F)` and `experts_down (E, F, D)`, and `mlp.gate.e_score_correction_bias` goes to the
`moe_bias` collection. MTP module d is HF layer `n_layers + d`. FP8 weights (float8_e4m3fn plus a
`weight_scale_inv` per 128x128 block) are dequantized to float32 on the way in.
The model computes in the checkpoint's own dtype (config.json's `dtype`, else its weights'), as transformers'
`dtype="auto"` does, unless `load_pretrained(path, dtype=...)` says otherwise.

Safetensors files are read with our own small reader (header + one tensor at a time), since
safetensors' numpy backend knows neither bfloat16 nor float8. Every problem with a checkpoint (missing,
unexpected or mis-shaped tensor, truncated or corrupt file) raises a one-line `CheckpointError` that
names the tensor and the file.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import init_variables
from dsv3_jax.model.moe.router import BIAS_COLLECTION

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"          # FP8: `<name>.weight_scale_inv` sits beside `<name>.weight`
DEFAULT_FP8_BLOCK = (128, 128)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
AUTO_DTYPE = "auto"   # load_pretrained's default: compute in the checkpoint's own dtype
_COMPUTE_DTYPES = {"F64": "float32", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                   "F8_E4M3": "bfloat16", "F8_E5M2": "bfloat16"}   # stored dtype -> ModelConfig.dtype


class CheckpointError(ValueError):
    """A checkpoint that does not fit the config (or cannot be read); the one-line message names tensor and file."""


# ==== safetensors reading ============================================================================

@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where one tensor lies: its file, dtype name, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(file_path: str) -> dict[str, _Entry]:
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


def _parse_entry(key: str, info: Any, file_path: str, data_start: int, size: int) -> _Entry:
    name = os.path.basename(file_path)
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{name}: corrupt safetensors header entry for tensor {key!r}") from None
    if dtype not in _ST_DTYPES:
        raise CheckpointError(f"{name}: tensor {key!r} has unsupported dtype {dtype}")
    expected = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if not (0 <= begin <= end) or end - begin != expected:
        raise CheckpointError(f"{name}: corrupt safetensors header: tensor {key!r} spans bytes [{begin}, {end}), "
                              f"but {dtype}{list(shape)} needs {expected}")
    if data_start + end > size:
        raise CheckpointError(f"{name}: truncated safetensors file: tensor {key!r} ends at byte {data_start + end}, "
                              f"the file has {size}")
    return _Entry(file_path, dtype, shape, data_start + begin, data_start + end)


class _Checkpoint:
    """The tensors of a checkpoint directory (one file, or shards listed by an index), read one at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files, self.label = _checkpoint_files(directory)
        self.entries: dict[str, _Entry] = {}
        for file_path in self.files:
            for key, entry in _read_header(file_path).items():
                if key in self.entries:
                    raise CheckpointError(f"{os.path.basename(file_path)}: tensor {key!r} also appears in "
                                          f"{os.path.basename(self.entries[key].file)}")
                self.entries[key] = entry
        self._check_index()

    def _check_index(self) -> None:
        """With an index, every tensor it lists must be in the shard it names (and no shard adds others)."""
        weight_map = self._weight_map()
        if weight_map is None:
            return
        for key, file_name in weight_map.items():
            entry = self.entries.get(key)
            if entry is None or os.path.basename(entry.file) != file_name:
                raise CheckpointError(f"{file_name}: tensor {key!r} is listed in {INDEX_FILE} but not in this file")
        for key, entry in self.entries.items():
            if key not in weight_map:
                raise CheckpointError(f"{os.path.basename(entry.file)}: tensor {key!r} is not listed in {INDEX_FILE}")

    def _weight_map(self) -> dict[str, str] | None:
        index_path = os.path.join(self.directory, INDEX_FILE)
        return _read_index(index_path) if self.label == INDEX_FILE else None

    def file_of(self, key: str) -> str:
        return os.path.basename(self.entries[key].file)

    def read(self, key: str) -> np.ndarray:
        """One tensor as a numpy array of its stored dtype (bfloat16 and float8 via ml_dtypes)."""
        entry = self.entries[key]
        buffer = bytearray(entry.end - entry.start)
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            got = f.readinto(buffer)
        if got != len(buffer):
            raise CheckpointError(f"{self.file_of(key)}: truncated safetensors file while reading tensor {key!r}")
        return np.frombuffer(buffer, dtype=_ST_DTYPES[entry.dtype]).reshape(entry.shape)


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


# ==== safetensors writing ============================================================================

@dataclasses.dataclass(frozen=True)
class _Out:
    """A tensor to write: its name, shape, numpy dtype and a function that produces it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_safetensors(path: str, tensors: list[_Out]) -> None:
    """Write one safetensors file, producing and writing one tensor at a time (largest itemsize first)."""
    ordered = sorted(tensors, key=lambda t: -t.dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in ordered:
        header[t.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
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


def _shard(tensors: list[_Out], max_shard_bytes: int) -> list[list[_Out]]:
    """Greedy split into consecutive shards of at most `max_shard_bytes` (a bigger single tensor gets its own)."""
    shards: list[list[_Out]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


# ==== the name map ===================================================================================
#  A `_Slot` says where one HF tensor lands in our variables: leaf `(collection, *path)`, at leading
#  `index` (layer, expert), after `kind`:
#    copy        as stored                       t   2-D transpose (HF Linear (out, in) -> kernel (in, out))
#    fused_gate  (E, 2F, D)[:, :F] -> (E, D, F)  fused_up  (E, 2F, D)[:, F:] -> (E, D, F)
#    t3          (E, D, F) -> (E, F, D)
#  `load=False` marks the MTP copies of the embedding and head: shape-checked, never stored.

@dataclasses.dataclass(frozen=True)
class _Slot:
    hf_name: str
    leaf: tuple[str, ...]
    index: tuple[int, ...] = ()
    kind: str = "copy"
    load: bool = True
    optional: bool = False


def _hf_shape(kind: str, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape whose `kind` transform has `target_shape`."""
    if kind == "t":
        return tuple(reversed(target_shape))
    if kind in ("fused_gate", "fused_up"):
        e, d, f = target_shape
        return (e, 2 * f, d)
    if kind == "t3":
        e, f, d = target_shape
        return (e, d, f)
    return tuple(target_shape)


def _to_ours(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "t":
        return array.T
    if kind in ("fused_gate", "fused_up"):
        half = array.shape[1] // 2
        part = array[:, :half] if kind == "fused_gate" else array[:, half:]
        return part.transpose(0, 2, 1)
    if kind == "t3":
        return array.transpose(0, 2, 1)
    return array


def _to_hf(kind: str, array: np.ndarray) -> np.ndarray:
    """Inverse of `_to_ours` for the kinds that saving uses."""
    if kind == "t":
        return array.T
    if kind == "copy":
        return array
    raise ValueError(f"saving never writes {kind!r} tensors")


def _attention_slots(c: ModelConfig, hf: str, ours: tuple[str, ...], index: tuple[int, ...]) -> list[_Slot]:
    a, o = hf + "self_attn.", ours + ("attn",)
    lin = lambda name, leaf: _Slot(f"{a}{name}.weight", o + (leaf, "kernel"), index, "t")
    norm = lambda name, leaf: _Slot(f"{a}{name}.weight", o + (leaf, "scale"), index)
    if c.q_lora_rank is None:
        query = [lin("q_proj", "wq")]
    else:
        query = [lin("q_a_proj", "wq_a"), norm("q_a_layernorm", "q_norm"), lin("q_b_proj", "wq_b")]
    return query + [lin("kv_a_proj_with_mqa", "wkv_a"), norm("kv_a_layernorm", "kv_norm"),
                    lin("kv_b_proj", "wkv_b"), lin("o_proj", "wo")]


def _mlp_slots(hf: str, ours: tuple[str, ...], index: tuple[int, ...]) -> list[_Slot]:
    return [_Slot(f"{hf}{p}_proj.weight", ours + (p, "kernel"), index, "t") for p in ("gate", "up", "down")]


def _moe_slots(c: ModelConfig, hf: str, ours: tuple[str, ...], index: tuple[int, ...], fused: bool) -> list[_Slot]:
    m, o = hf + "mlp.", ours + ("moe",)
    slots = [_Slot(f"{m}gate.weight", o + ("router", "kernel"), index, "t"),
             _Slot(f"{m}gate.e_score_correction_bias", (BIAS_COLLECTION,) + o[1:] + ("router", "bias"), index,
                   optional=True)]
    if c.n_shared_experts > 0:
        slots += _mlp_slots(f"{m}shared_experts.", o + ("shared",), index)
    leaf = lambda name: o + (f"experts_{name}",)
    if fused:
        return slots + [_Slot(f"{m}experts.gate_up_proj", leaf("gate"), index, "fused_gate"),
                        _Slot(f"{m}experts.gate_up_proj", leaf("up"), index, "fused_up"),
                        _Slot(f"{m}experts.down_proj", leaf("down"), index, "t3")]
    for j in range(c.n_routed_experts):
        slots += [_Slot(f"{m}experts.{j}.{p}_proj.weight", leaf(p), index + (j,), "t") for p in ("gate", "up", "down")]
    return slots


def _block_slots(c: ModelConfig, hf: str, ours: tuple[str, ...], index: tuple[int, ...], use_moe: bool,
                 fused: bool) -> list[_Slot]:
    """One decoder block: HF prefix `hf` (e.g. 'model.layers.3.'), our leaf prefix `ours` ('params', ...)."""
    slots = [_Slot(f"{hf}input_layernorm.weight", ours + ("attn_norm", "scale"), index),
             _Slot(f"{hf}post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), index)]
    slots += _attention_slots(c, hf, ours, index)
    if use_moe:
        return slots + _moe_slots(c, hf, ours, index, fused)
    return slots + _mlp_slots(f"{hf}mlp.", ours + ("mlp",), index)


def _mtp_slots(c: ModelConfig, depth: int, fused: Callable[[str], bool]) -> list[_Slot]:
    hf, ours = f"model.layers.{c.n_layers + depth}.", ("params", f"mtp_{depth}")
    tied = c.tie_word_embeddings
    head = (("params", "embed", "embedding"), "copy") if tied else (("params", "lm_head", "kernel"), "t")
    return [
        _Slot(f"{hf}embed_tokens.weight", ("params", "embed", "embedding"), load=False),
        _Slot(f"{hf}enorm.weight", ours + ("enorm", "scale")),
        _Slot(f"{hf}hnorm.weight", ours + ("hnorm", "scale")),
        _Slot(f"{hf}eh_proj.weight", ours + ("eh_proj", "kernel"), kind="t"),
        *_block_slots(c, hf, ours + ("block",), (), True, fused(hf)),
        _Slot(f"{hf}shared_head.norm.weight", ours + ("head_norm", "scale")),
        _Slot(f"{hf}shared_head.head.weight", head[0], kind=head[1], load=False),
    ]


def _plan(c: ModelConfig, fused: Callable[[str], bool] = lambda prefix: False) -> list[_Slot]:
    """Every HF tensor of `c`, in HF order; `fused(prefix)` says whether a layer stores fused experts."""
    slots = [_Slot("model.embed_tokens.weight", ("params", "embed", "embedding"))]
    for i in range(c.n_layers):
        hf, use_moe = f"model.layers.{i}.", i >= c.first_k_dense_replace
        stack = "moe_layers" if use_moe else "dense_layers"
        index = (i - c.first_k_dense_replace,) if use_moe else (i,)
        slots += _block_slots(c, hf, ("params", stack), index, use_moe, fused(hf))
    slots.append(_Slot("model.norm.weight", ("params", "final_norm", "scale")))
    if not c.tie_word_embeddings:
        slots.append(_Slot("lm_head.weight", ("params", "lm_head", "kernel"), kind="t"))
    for depth in range(c.num_mtp_modules):
        slots += _mtp_slots(c, depth, fused)
    return slots


@functools.lru_cache(maxsize=8)
def _leaf_specs(c: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Shape and dtype of each of our variables, keyed by (collection, *path)."""
    abstract = jax.eval_shape(functools.partial(init_variables, c), jax.random.PRNGKey(0))
    return dict(_flatten(abstract))


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (str(key),))
    else:
        yield prefix, tree


def _group_by_leaf(slots: list[_Slot], specs: dict) -> dict[tuple[str, ...], list[_Slot]]:
    """Slots per leaf, checking (an internal invariant) that the loaded slots cover each leaf exactly once."""
    groups: dict[tuple[str, ...], list[_Slot]] = {leaf: [] for leaf in specs}
    for s in slots:
        if s.load and s.leaf not in groups:
            raise RuntimeError(f"internal: HF name map targets {'/'.join(s.leaf)}, which the model does not have")
        if s.load:
            groups[s.leaf].append(s)
    for leaf, group in groups.items():
        indices = [s.index for s in group]
        depth = len(indices[0]) if indices else 0
        if (not group or len(set(indices)) != len(indices) or any(len(i) != depth for i in indices)
                or len(indices) != math.prod(specs[leaf].shape[:depth])):
            raise RuntimeError(f"internal: HF name map does not cover variable {'/'.join(leaf)} exactly once")
    return groups


def _target_shape(slot: _Slot, specs: dict) -> tuple[int, ...]:
    return tuple(specs[slot.leaf].shape[len(slot.index):])


# ==== loading ========================================================================================

def load_pretrained(path: str | os.PathLike, dtype: str = AUTO_DTYPE,
                    param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Read an HF DeepSeek-V2/V3 checkpoint directory into (ModelConfig, {'params', 'moe_bias'}).

    `dtype` is the compute dtype (`ModelConfig.dtype`): "auto" (or None) takes the checkpoint's own, as
    transformers' `dtype="auto"` does (see `checkpoint_dtype`); "float32", "bfloat16" or "float16" override it.
    `param_dtype` (default: ModelConfig's, float32) is the dtype the weights are held in.
    """
    directory = os.fspath(path)
    raw_config = _read_raw_config(directory)
    explicit = None if dtype == AUTO_DTYPE else dtype
    changes = {k: v for k, v in (("dtype", explicit), ("param_dtype", param_dtype)) if v is not None}
    config = ModelConfig.from_hf(raw_config, **changes)
    checkpoint = _Checkpoint(directory)
    if explicit is None:
        config = config.replace(dtype=checkpoint_dtype(raw_config, checkpoint.entries))
    config = _drop_absent_mtp(config, checkpoint)
    plan = _plan(config, lambda prefix: f"{prefix}mlp.experts.gate_up_proj" in checkpoint.entries)
    specs = _leaf_specs(config)
    block = _fp8_block(raw_config)
    _check_names(plan, checkpoint)
    _check_shapes(plan, checkpoint, specs, block)
    return config, _build_variables(plan, checkpoint, specs, block)


def checkpoint_dtype(raw_config: dict[str, Any], entries: dict[str, _Entry]) -> str:
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


def _drop_absent_mtp(config: ModelConfig, checkpoint: _Checkpoint) -> ModelConfig:
    """A config with MTP modules but a checkpoint without any (HF drops them on save): drop MTP, warn once."""
    if config.num_mtp_modules == 0:
        return config
    prefixes = tuple(f"model.layers.{config.n_layers + d}." for d in range(config.num_mtp_modules))
    if any(key.startswith(prefixes) for key in checkpoint.entries):
        return config
    warnings.warn(f"config.json asks for {config.num_mtp_modules} MTP module(s) (num_nextn_predict_layers) but "
                  f"{checkpoint.label} holds no model.layers.{config.n_layers}.* tensors; loading without MTP",
                  stacklevel=3)
    return config.replace(num_mtp_modules=0)


def _fp8_block(raw_config: dict[str, Any]) -> tuple[int, int]:
    block = (raw_config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_FP8_BLOCK
    return int(block[0]), int(block[1])


def _ignorable(key: str) -> bool:
    """Buffers some exporters save that carry no weights."""
    return ".rotary_emb." in key or key.endswith(".inv_freq")


def _check_names(plan: list[_Slot], checkpoint: _Checkpoint) -> None:
    expected = {s.hf_name for s in plan}
    for s in plan:
        if not s.optional and s.hf_name not in checkpoint.entries:
            raise CheckpointError(f"{checkpoint.label}: tensor {s.hf_name!r} is missing from the checkpoint")
    for key in checkpoint.entries:
        base = key[: -len(SCALE_SUFFIX)] if key.endswith(SCALE_SUFFIX) else key
        if base not in expected and not _ignorable(key):
            raise CheckpointError(f"{checkpoint.file_of(key)}: unexpected tensor {key!r} (not in this config's layout)")


def _check_shapes(plan: list[_Slot], checkpoint: _Checkpoint, specs: dict, block: tuple[int, int]) -> None:
    """Shapes and dtypes of every tensor (and FP8 scale), before anything large is built."""
    for s in plan:
        entry = checkpoint.entries.get(s.hf_name)
        if entry is None:
            continue
        where = f"{checkpoint.file_of(s.hf_name)}: tensor {s.hf_name!r}"
        want = _hf_shape(s.kind, _target_shape(s, specs))
        if entry.shape != want:
            raise CheckpointError(f"{where} has shape {list(entry.shape)}, expected {list(want)}")
        _check_dtype(s.hf_name, entry, checkpoint, block, where)


def _check_dtype(key: str, entry: _Entry, checkpoint: _Checkpoint, block: tuple[int, int], where: str) -> None:
    scale = checkpoint.entries.get(key + SCALE_SUFFIX)
    if entry.dtype in _FP8_DTYPES:
        if scale is None:
            raise CheckpointError(f"{where} is {entry.dtype} but has no sibling {key + SCALE_SUFFIX!r}")
        if len(entry.shape) != 2:
            raise CheckpointError(f"{where} is {entry.dtype}: only 2-D weights can be block-quantized")
    elif entry.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{where} has dtype {entry.dtype}, expected a floating-point type")
    if scale is None:
        return
    scale_where = f"{checkpoint.file_of(key + SCALE_SUFFIX)}: tensor {key + SCALE_SUFFIX!r}"
    if entry.dtype not in _FP8_DTYPES:
        raise CheckpointError(f"{scale_where} scales a {entry.dtype} weight; only float8 weights carry scales")
    want = tuple(-(-n // b) for n, b in zip(entry.shape, block))
    if scale.shape != want or scale.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{scale_where} is {scale.dtype}{list(scale.shape)}, expected a float tensor of "
                              f"shape {list(want)} (blocks of {block[0]}x{block[1]})")


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = DEFAULT_FP8_BLOCK) -> np.ndarray:
    """float32 weight = fp8 weight * scale_inv, each scale covering one block (edge blocks cropped)."""
    rows, cols = weight.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)
    return weight.astype(np.float32) * scale[:rows, :cols]


def _read_real(checkpoint: _Checkpoint, key: str, block: tuple[int, int]) -> np.ndarray:
    array = checkpoint.read(key)
    if checkpoint.entries[key].dtype in _FP8_DTYPES:
        array = dequantize_fp8(array, checkpoint.read(key + SCALE_SUFFIX), block)
    return array


def _build_variables(plan: list[_Slot], checkpoint: _Checkpoint, specs: dict, block: tuple[int, int]) -> dict:
    """Fill one leaf at a time (each HF tensor read when its leaf is built) and hand it to JAX."""
    variables: dict = {}
    for leaf, slots in _group_by_leaf(plan, specs).items():
        spec = specs[leaf]
        array = np.zeros(spec.shape, dtype=np.dtype(spec.dtype))
        for s in slots:
            if s.hf_name in checkpoint.entries:
                array[s.index] = _to_ours(s.kind, _read_real(checkpoint, s.hf_name, block))
        _set_leaf(variables, leaf, jnp.asarray(array))
        del array
    return variables


def _set_leaf(tree: dict, leaf: tuple[str, ...], value: Any) -> None:
    for key in leaf[:-1]:
        tree = tree.setdefault(key, {})
    tree[leaf[-1]] = value


def _get_leaf(tree: Any, leaf: tuple[str, ...]) -> Any:
    for key in leaf:
        tree = tree[key]
    return tree


# ==== saving =========================================================================================

def save_pretrained(config: ModelConfig, variables: dict, path: str | os.PathLike,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json and HF-layout safetensors (per-expert names, MTP as layer n_layers + d)."""
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    variables = nn.meta.unbox(variables)
    specs = _leaf_specs(config)
    _check_variables(variables, specs)
    _warn_if_transformers_differs(config)
    tensors = [_output(s, variables, specs, config) for s in _plan(config) if _should_write(s, variables, config)]
    # Everything is written into a staging folder first: a save that fails half-way leaves the
    # directory's earlier checkpoint as it was.
    staging = tempfile.mkdtemp(prefix=".saving-", dir=directory)
    try:
        shards = _shard(tensors, max_shard_bytes)
        if len(shards) == 1:
            _write_safetensors(os.path.join(staging, SINGLE_FILE), shards[0])
        else:
            _write_shards(staging, shards)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2, sort_keys=True)
            f.write("\n")
        _remove_stale_files(directory)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_variables(variables: dict, specs: dict) -> None:
    for leaf, spec in specs.items():
        try:
            value = _get_leaf(variables, leaf)
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


def _should_write(slot: _Slot, variables: dict, config: ModelConfig) -> bool:
    """Correction biases go out for V3 (sigmoid) models, and for V2 ones only when they are not all zero."""
    if slot.leaf[0] != BIAS_COLLECTION or config.scoring_func == "sigmoid":
        return True
    return bool(np.any(np.asarray(_get_leaf(variables, slot.leaf)[slot.index]) != 0))


def _output(slot: _Slot, variables: dict, specs: dict, config: ModelConfig) -> _Out:
    dtype = np.dtype(np.float32) if slot.leaf[0] == BIAS_COLLECTION else np.dtype(config.jnp_param_dtype)
    produce = lambda: _to_hf(slot.kind, np.asarray(_get_leaf(variables, slot.leaf)[slot.index])).astype(dtype)
    return _Out(slot.hf_name, _hf_shape(slot.kind, _target_shape(slot, specs)), dtype, produce)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_shards(directory: str, shards: list[list[_Out]]) -> None:
    weight_map = {}
    for i, shard in enumerate(shards):
        name = _shard_name(i, len(shards))
        _write_safetensors(os.path.join(directory, name), shard)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def _remove_stale_files(directory: str) -> None:
    """Earlier saves' weights in the same directory (they would mix with the new ones on load)."""
    stale = glob.glob(os.path.join(directory, "model-*-of-*.safetensors"))
    stale += [os.path.join(directory, n) for n in (SINGLE_FILE, INDEX_FILE)]
    for file_path in stale:
        if os.path.isfile(file_path):
            os.remove(file_path)
