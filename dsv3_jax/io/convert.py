"""Convert Hugging Face DeepSeek-V2/V3 checkpoints to pre-training checkpoints (`import_hf`) and back (`export_hf`),
a leaf or an HF tensor at a time, so the host never holds the whole model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from typing import Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

import jax_compat
from dsv3_jax.io import hf
from dsv3_jax.model import fp8_weights
from dsv3_jax.io.checkpoint import FRESH_DATA_KEY, model_signature
from dsv3_jax.config import ModelConfig, YarnConfig
from dsv3_jax.model.moe.layer import EXPERT_WEIGHTS
from dsv3_jax.model.moe.router import BIAS_COLLECTION
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.step import TrainState
from pallas_kernels.fp8 import dequantize

CHECKPOINTS = "checkpoints"
_E4M3 = hf.SAFETENSORS_DTYPES["F8_E4M3"]   # the float8 kind that `keep_fp8` keeps


class ConvertError(ValueError):
    """Bad input for a conversion (the message is one line)."""


# ==== lazy leaves, written one at a time ==============================================================

SLICED_WRITE_BYTES = 256 << 20   # leaves above this (and made of HF tensors) are written tensor by tensor


@dataclasses.dataclass(frozen=True, eq=False)
class _Lazy:
    """A leaf that exists only as its shape and dtype until `produce()` builds it.

    Every leaf of an imported `state` is one. The type handler registered for it (a NumpyHandler with private
    methods overridden: jax_compat.register_lazy_leaf_handler) produces and writes the leaves strictly one after
    another, awaiting each write before building the next, so the host holds one of our leaves (plus the HF tensor
    being copied into it) at a time rather than the whole model. The leaves are written with orbax's PyTreeSave,
    the same on-disk format StandardSave writes (typed 'np.ndarray'); restoring with StandardRestore(abstract)
    yields jax arrays."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]
    # Optionally the same values as (index, block) pieces (an HF tensor, or a slab of zeros): a leaf larger than
    # SLICED_WRITE_BYTES is then written piece by piece into chunks of about one piece, never built whole.
    parts: Callable[[], Iterable[tuple[tuple, np.ndarray]]] | None = None
    piece_bytes: int = 0   # bytes of one piece: the chunk size asked of orbax
    piece_axes: int = 0    # leading axes the pieces split (orbax splits them first when choosing chunks)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def sliced(self) -> bool:
        """Written piece by piece (jax_compat.register_lazy_leaf_handler), never built whole."""
        return self.parts is not None and self.nbytes > SLICED_WRITE_BYTES


def _register_lazy_handler() -> None:
    """Teach orbax to write `_Lazy` leaves; done when a conversion runs, not at import, so that importing this
    module leaves orbax's handlers for everyone else (pre-training included) as they were."""
    jax_compat.register_lazy_leaf_handler(_Lazy)


ZERO_PIECE_BYTES = 64 << 20   # a large all-zero leaf is written in slabs of about this


def _zeros(shape, dtype) -> _Lazy:
    """An all-zero leaf. A large one is written in slabs of R rows along axis k, the first axis whose rows
    (shape[k+1:]) fit in ZERO_PIECE_BYTES, for every index of the axes before k; one zero slab is reused."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    row_bytes = lambda k: int(np.prod(shape[k + 1:], dtype=np.int64)) * dtype.itemsize
    k = 0
    while k < len(shape) - 1 and row_bytes(k) > ZERO_PIECE_BYTES:
        k += 1
    rows = max(1, min(shape[k], ZERO_PIECE_BYTES // row_bytes(k))) if shape else 1

    def parts():
        slab = np.zeros((rows,) + shape[k + 1:], dtype)
        for index in np.ndindex(*shape[:k]):
            for start in range(0, shape[k], rows):
                stop = min(start + rows, shape[k])
                yield index + (slice(start, stop),), slab[:stop - start]

    return _Lazy(shape, dtype, lambda: np.zeros(shape, dtype), parts=parts if shape else None,
                 piece_bytes=rows * row_bytes(k) if shape else 0, piece_axes=k + 1)


# ==== HF -> orbax =====================================================================================

@dataclasses.dataclass(frozen=True)
class ImportReport:
    config: ModelConfig
    step_dir: str
    n_leaves: int
    largest_leaf_bytes: int
    state_bytes: int
    fp8_leaves: int = 0      # weights kept as FP8 (each with a scales leaf)
    params_bytes: int = 0    # the params as written (FP8 weights at one byte each)


def _part_ndim(slots) -> int:
    """How many leading axes the slots' indices select (1: a layer stack, 2: layer and expert), or 0 when they
    differ or select nothing: such a leaf is written whole."""
    lengths = {len(s.index) if all(isinstance(i, int) for i in s.index) else 0 for s in slots}
    return lengths.pop() if len(lengths) == 1 else 0


def _keeps_fp8(leaf: tuple[str, ...], slots, tensors: hf.CheckpointTensors) -> bool:
    """A projection kernel or routed-expert weight whose every HF tensor is a 2-D E4M3 weight with block scales."""
    weight = leaf[-1] == "kernel" and "router" not in leaf or leaf[-1] in EXPERT_WEIGHTS
    return weight and leaf[0] == "params" and all(
        s.kind == "t" and s.hf_name in tensors.entries and tensors.entries[s.hf_name].dtype == "F8_E4M3"
        for s in slots)


def _build_fp8_leaf(slots, tensors: hf.CheckpointTensors, shape, scales: bool) -> np.ndarray:
    """A kept FP8 weight (scales=False) or its block scales (True), transposed from HF's (out, in) layout."""
    dtype = np.float32 if scales else _E4M3
    array = np.zeros(shape, dtype)
    for s in slots:
        array[s.index] = tensors.read(s.hf_name + hf.SCALE_SUFFIX if scales else s.hf_name).T
    return array


def lazy_variables(hf_dir: str, param_dtype: str = "float32", keep_fp8: bool = False):
    """(config, {'params', 'moe_bias'}, FP8 scales) of `_Lazy` leaves for an HF checkpoint directory, fully
    checked; with `keep_fp8`, FP8 weights stay FP8 and the scales tree (shaped like part of params) holds their
    scales, else it is empty."""
    checked = hf.open_checked(hf_dir, param_dtype=param_dtype)
    tensors, block = checked.tensors, checked.block
    if keep_fp8 and block != (fp8_weights.BLOCK, fp8_weights.BLOCK):
        raise ConvertError(f"--fp8 keeps 128x128-block FP8 weights; config.json's quantization_config."
                           f"weight_block_size is {list(block)} (convert without --fp8 to dequantise)")
    variables: dict = {"params": {}, BIAS_COLLECTION: {}}
    scales: dict = {}
    for leaf, slots in checked.slots_by_leaf().items():
        spec = checked.specs[leaf]
        shape = tuple(spec.shape)
        if keep_fp8 and _keeps_fp8(leaf, slots, tensors):
            hf.set_leaf(variables, leaf, _Lazy(shape, _E4M3, functools.partial(
                _build_fp8_leaf, slots, tensors, shape, False)))
            scale_shape = fp8_weights.scale_shape(shape)
            hf.set_leaf(scales, leaf[1:], _Lazy(scale_shape, np.dtype(np.float32), functools.partial(
                _build_fp8_leaf, slots, tensors, scale_shape, True)))
            continue
        produce = functools.partial(hf.build_leaf, slots, tensors, spec, block)
        part_ndim = _part_ndim(slots)
        parts = functools.partial(hf.leaf_pieces, slots, tensors, block) if part_ndim else None
        piece_bytes = int(np.prod(shape[part_ndim:], dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        hf.set_leaf(variables, leaf, _Lazy(shape, np.dtype(spec.dtype), produce, parts, piece_bytes, part_ndim))
    return checked.config, variables, scales


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree,
                        is_leaf=lambda x: isinstance(x, _Lazy))


def lazy_train_state(config: ModelConfig, variables: dict, seed: int = 0) -> TrainState:
    """TrainState of `_Lazy` leaves: the converted variables and a fresh (all-zero) AdamW state, whose moments
    have the master dtype also for weights kept as FP8."""
    tx = make_optimizer(OptimizerConfig())
    params = variables["params"]
    master_dtype = lambda x: config.jnp_param_dtype if x.dtype == _E4M3 else x.dtype
    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, master_dtype(x)), _abstract(params))
    opt_abstract = jax.eval_shape(tx.init, master)
    opt_state = jax.tree.map(lambda s: _zeros(s.shape, s.dtype), opt_abstract)
    _, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    rng = np.asarray(jax.random.key_data(state_rng))
    return TrainState(_zeros((), np.int32), params, variables.get(BIAS_COLLECTION, {}), opt_state,
                      _Lazy(rng.shape, rng.dtype, lambda: rng.copy()))


def _manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def import_hf(hf_dir: str, workdir: str, param_dtype: str = "float32", seed: int = 0,
              keep_fp8: bool = False) -> ImportReport:
    """Write `workdir/checkpoints/0` from the HF checkpoint in `hf_dir`: what experiments.pretrain resumes.

        import_hf(hf_dir, workdir)                  # HF safetensors (BF16, or FP8 + weight_scale_inv; MTP included)
        import_hf(hf_dir, workdir, keep_fp8=True)   # FP8 weights stay FP8, their block scales in item fp8_scales

    The HF directory is checked completely first (config.json, every safetensors header, every tensor's name,
    shape and dtype: `dsv3_jax.io.hf.open_checked`), before anything is written, so a bad or truncated checkpoint
    fails with hf's one-line `CheckpointError` and leaves no output. The output is an orbax step 0 under
    `workdir/checkpoints`, with the items `dsv3_jax.io.checkpoint.Checkpointer` restores:

    * `state`: TrainState(step=0, params, moe_bias, opt_state, rng). params/moe_bias are what
      `hf.load_pretrained` would return (the same per-leaf code, `hf.build_leaf`, so bit-identical). opt_state is a
      fresh `make_optimizer(OptimizerConfig())` state: all zeros (moments, count, injected learning rate), which is
      what `tx.init` produces. rng is `create_train_state`'s state key for `seed`.
    * `meta`: {"model": model_signature(config), "tokens_seen": 0, "loss_ema": None, "converted_from": ...}.
    * `data`: {"fresh": true, ...}: a marker, since a real data-iterator state needs the run's data config,
      tokenizer and fingerprint; pre-training starts its data stream afresh when it sees it
      (`dsv3_jax.io.checkpoint.FRESH_DATA_KEY`).

    FP8 kept (`keep_fp8`, `experiments.convert --fp8`): the projections (every Linear kernel but the router's) and
    routed experts that the HF checkpoint stores as float8_e4m3fn with 128x128 `weight_scale_inv` blocks are
    written as float8_e4m3fn (transposed, exactly) into `state`, and their scales (transposed) into a fourth item,
    `fp8_scales`, a tree shaped like the part of `params` they scale; `meta["fp8_scales"]` is true. That halves
    those weights' bytes against BF16 (a quarter of float32). The AdamW moments stay in the master dtype. Weights
    stored in any other way (BF16, E5M2, other block sizes are refused) are dequantised as without the flag.
    Readers: `experiments.generate --ckpt` runs the kept kernels as FP8 matmuls with their scales
    (dsv3_jax.model.fp8_weights); pre-training (`Checkpointer.restore`) and `export_hf` dequantise them into master
    weights, the same values as an import without the flag.

    orbax writes into a temporary directory and renames it on success: an interrupted conversion is never listed
    as a step; a failed one removes what it created."""
    hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
    _register_lazy_handler()
    config, variables, scales = lazy_variables(hf_dir, param_dtype, keep_fp8)
    state = lazy_train_state(config, variables, seed)
    ckpt_dir = os.path.join(workdir, CHECKPOINTS)
    if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
        raise ConvertError(f"{ckpt_dir} already holds a checkpoint; convert into an empty --out")
    created = [p for p in (workdir, ckpt_dir) if not os.path.exists(p)]
    meta = {"model": model_signature(config), "tokens_seen": 0, "loss_ema": None, "converted_from": hf_dir}
    data = {FRESH_DATA_KEY: True, "converted_from": hf_dir}
    items = dict(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data))
    if scales:
        meta[fp8_weights.SCALES_ITEM] = True
        items[fp8_weights.SCALES_ITEM] = ocp.args.PyTreeSave(scales)
    leaves = jax.tree.leaves((state, scales), is_leaf=lambda x: isinstance(x, _Lazy))
    try:
        manager = _manager(ckpt_dir)
        try:
            manager.save(0, force=True, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))
            manager.wait_until_finished()
        finally:
            manager.close()
    except BaseException:
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        elif os.path.isdir(ckpt_dir):
            for name in os.listdir(ckpt_dir):
                if "tmp" in name:
                    shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        raise
    fp8_leaves = jax.tree.leaves(scales, is_leaf=lambda x: isinstance(x, _Lazy))
    return ImportReport(config, os.path.join(ckpt_dir, "0"), len(leaves), max(x.nbytes for x in leaves),
                        sum(x.nbytes for x in leaves), len(fp8_leaves),
                        sum(x.nbytes for x in jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, _Lazy))))


# ==== orbax -> HF =====================================================================================

def checkpoints_dir(path: str) -> str:
    """`path` itself, or its `checkpoints/` folder (a pre-training --workdir)."""
    inner = os.path.join(path, CHECKPOINTS)
    return inner if os.path.isdir(inner) else path


def config_from_signature(signature: dict) -> ModelConfig:
    fields = dict(signature)
    if isinstance(fields.get("rope_scaling"), dict):
        fields["rope_scaling"] = YarnConfig(**fields["rope_scaling"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known}).validate()


def _open_array(item_dir: str, name: str, context: ts.Context):
    """A lazy tensorstore view of one array that orbax wrote into `item_dir` (OCDBT or per-array zarr)."""
    if os.path.exists(os.path.join(item_dir, "manifest.ocdbt")):
        kvstore = {"driver": "ocdbt", "base": f"file://{item_dir}", "path": name}
    else:
        kvstore = {"driver": "file", "path": os.path.join(item_dir, name)}
    last = None
    for driver in ("zarr3", "zarr"):
        try:
            return ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True, context=context).result()
        except ValueError as e:
            last = e
    raise ConvertError(f"{item_dir}: cannot open array {name} ({last})")


@dataclasses.dataclass(frozen=True)
class OpenedCheckpoint:
    """One step of a pre-training checkpoint, its arrays as lazy views (np.asarray reads one)."""

    config: ModelConfig
    step: int
    variables: dict   # {'params', 'moe_bias'}; weights kept as FP8 (an --fp8 import) are float8_e4m3fn
    scales: dict      # their block scales, a tree shaped like the part of params they scale ({} if none)


def open_checkpoint(ckpt: str, step: int | None = None) -> OpenedCheckpoint:
    """The params and routing biases of step `step` (default: the latest) of a pre-training checkpoint (a
    --workdir or its checkpoints/ folder), opened lazily: the optimizer state is never read."""
    directory = checkpoints_dir(os.path.abspath(ckpt))
    if not os.path.isdir(directory):
        raise ConvertError(f"{ckpt}: no such checkpoint directory")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise ConvertError(f"{directory}: no checkpoint step {'' if step is None else step}".rstrip())
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()
    config = config_from_signature(meta["model"])
    item_dir = os.path.join(directory, str(step), "state")
    scales_dir = os.path.join(directory, str(step), fp8_weights.SCALES_ITEM)
    variables: dict = {}
    scales: dict = {}
    context = ts.Context()
    cache = _LeafCache()
    for leaf in hf.leaf_specs(config):
        field = "params" if leaf[0] == "params" else "moe_bias"
        array = _CachedLeaf(_open_array(item_dir, ".".join((field,) + leaf[1:]), context), cache)
        hf.set_leaf(variables, leaf, array)
        if meta.get(fp8_weights.SCALES_ITEM) and array.dtype.numpy_dtype == _E4M3:
            hf.set_leaf(scales, leaf[1:], _open_array(scales_dir, ".".join(leaf[1:]), context))
    return OpenedCheckpoint(config, step, variables, scales)


class _LeafCache:
    """The last few whole arrays read, least recently used first out. Unless the import wrote a leaf piece by
    piece (one chunk per HF tensor), orbax chunks a stacked leaf over all its layers and experts
    (e.g. [3, 64, 1024, 1408] for a [3, 64, 2048, 1408] leaf), so reading one expert's slice
    decompresses a whole chunk: HF export, which walks layer by layer and expert by expert through the gate, up
    and down stacks in turn, reads each of those three leaves once and slices it in memory (peak: about three
    of the largest leaves)."""

    def __init__(self, size: int = 3):
        self.size, self.arrays = size, {}

    def get(self, key, read):
        if key not in self.arrays:
            if len(self.arrays) >= self.size:
                self.arrays.pop(next(iter(self.arrays)))
            self.arrays[key] = read()
        self.arrays[key] = self.arrays.pop(key)   # most recently used last
        return self.arrays[key]


class _CachedLeaf:
    """A lazy tensorstore array whose slices come from one whole read, kept in a shared `_LeafCache`."""

    def __init__(self, array, cache: _LeafCache):
        self.array, self.cache = array, cache

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self):
        return self.array.dtype

    def __getitem__(self, index) -> np.ndarray:
        chunk = self.array.chunk_layout.read_chunk.shape
        if chunk and chunk[0] == 1 and self.array.shape[0] > 1:   # written piece by piece: read just the piece
            return self.array[index].read().result()
        return self.cache.get(id(self), lambda: self.array.read().result())[index]

    def __array__(self, dtype=None, copy=None):   # the whole array, read once (generation loads every leaf)
        return np.asarray(self.array.read().result(), dtype=dtype)


def export_hf(ckpt: str, out_hf: str, step: int | None = None,
              max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> ModelConfig:
    """Write the params and routing biases of a pre-training checkpoint as an HF checkpoint directory (weights
    kept as FP8 are dequantised into the parameter dtype).

        export_hf(ckpt, out_hf)   # a pre-training checkpoint's params + moe_bias -> HF layout (save_pretrained)

    `open_checkpoint` reads the step's `meta` for the model config and opens each params/moe_bias array of the
    `state` item (and the scales of kept FP8 weights) as a lazy tensorstore view; `hf.save_pretrained` slices them
    (one layer / expert at a time), transposes and writes one HF tensor at a time, FP8 weights dequantised slice by
    slice. The optimizer state is not read (`experiments.generate --ckpt` reads the same way)."""
    opened = open_checkpoint(ckpt, step)
    variables = opened.variables
    specs = hf.leaf_specs(opened.config)
    for path, scale in hf.flatten(opened.scales):
        leaf = ("params",) + path
        hf.set_leaf(variables, leaf, _Dequantized(hf.get_leaf(variables, leaf), scale, np.dtype(specs[leaf].dtype)))
    hf.save_pretrained(opened.config, variables, out_hf, max_shard_bytes=max_shard_bytes)
    return opened.config


class _Dequantized:
    """A kept FP8 weight and its block scales (lazy views), read as master-dtype values one slice at a time."""

    def __init__(self, weight, scale, dtype: np.dtype):
        self.weight, self.scale, self.dtype = weight, scale, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def __getitem__(self, index) -> np.ndarray:
        w, s = np.asarray(self.weight[index]), np.asarray(self.scale[index])
        return dequantize(w, s, (fp8_weights.BLOCK, fp8_weights.BLOCK), self.dtype)
