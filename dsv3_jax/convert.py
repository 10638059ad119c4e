"""Convert Hugging Face DeepSeek-V2/V3 checkpoints to pre-training checkpoints and back.

    import_hf(hf_dir, workdir)     # HF safetensors (BF16, or FP8 + weight_scale_inv; MTP included)
                                   #   -> workdir/checkpoints/0/{state,data,meta}, what experiments.pretrain resumes
    export_hf(ckpt, out_hf)        # a pre-training checkpoint's params + moe_bias -> HF layout (save_pretrained)

Import
------
The HF directory is checked completely first (config.json, every safetensors header, every tensor's name,
shape and dtype: `dsv3_jax.hf`'s checks), before anything is written, so a bad or truncated checkpoint fails
with hf.py's one-line `CheckpointError` and leaves no output. The output is an orbax step 0 under
`workdir/checkpoints`, with the items `dsv3_jax.checkpoint.Checkpointer` restores:

* `state`: TrainState(step=0, params, moe_bias, opt_state, rng). params/moe_bias are what
  `hf.load_pretrained` would return (same per-leaf code, so bit-identical). opt_state is a fresh
  `make_optimizer(OptimizerConfig())` state: all zeros (moments, count, injected learning rate), which is
  what `tx.init` produces. rng is `create_train_state`'s state key for `seed`.
* `meta`: {"model": model_signature(config), "tokens_seen": 0, "loss_ema": None, "converted_from": ...}.
* `data`: {"fresh": true, ...}: a marker, since a real data-iterator state needs the run's data config,
  tokenizer and fingerprint; pre-training starts its data stream afresh when it sees it
  (`dsv3_jax.checkpoint.FRESH_DATA_KEY`).

Memory: every leaf of `state` is a `_Lazy` placeholder (shape, dtype, produce()). A type handler registered
for it (a NumpyHandler) produces and writes the leaves strictly one after another, awaiting each write before
building the next, so the host holds one of our leaves (plus the HF tensor being copied into it) at a time
rather than the whole model. The leaves are written with orbax's PyTreeSave, the same on-disk format
StandardSave writes (typed 'np.ndarray'); restoring with StandardRestore(abstract) yields jax arrays.
orbax writes into a temporary directory and renames it on success: an interrupted conversion is never
listed as a step; a failed one removes what it created.

Export
------
Reads the step's `meta` for the model config, opens each params/moe_bias array of the `state` item as a lazy
tensorstore view and hands those to `hf.save_pretrained`, which slices (one layer / expert at a time),
transposes and writes one HF tensor at a time. Opt state is not read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.futures import future as ocp_future

from dsv3_jax import hf
from dsv3_jax.checkpoint import FRESH_DATA_KEY, model_signature
from dsv3_jax.config import ModelConfig, YarnConfig
from dsv3_jax.moe.router import BIAS_COLLECTION
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.step import TrainState

CHECKPOINTS = "checkpoints"


class ConvertError(ValueError):
    """Bad input for a conversion (the message is one line)."""


# ==== lazy leaves, written one at a time ==============================================================

@dataclasses.dataclass(frozen=True, eq=False)
class _Lazy:
    """A leaf that exists only as its shape and dtype until `produce()` builds it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class _LazyHandler(ocp.type_handlers.NumpyHandler):
    """Writes `_Lazy` leaves as numpy arrays, producing each only once the previous one is on disk."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        return [ocp_future.CommitFutureAwaitingContractedSignals(
            self._one_by_one(list(values), list(infos), list(args)), name="convert_lazy_leaves")]

    async def _one_by_one(self, values, infos, args):
        for value, info, arg in zip(values, infos, args):
            array = np.asarray(value.produce(), dtype=value.dtype)
            array = array if array.flags.c_contiguous else array.copy()
            if array.shape != tuple(value.shape):
                raise RuntimeError(f"internal: {info.name} came out {array.shape}, expected {value.shape}")
            await self._background_serialize([array], [info], [arg])
            del array


def _register_lazy_handler() -> None:
    """Teach orbax to write `_Lazy` leaves; done when a conversion runs, not at import, so that importing this
    module leaves orbax's handlers for everyone else (pre-training included) as they were."""
    if not ocp.type_handlers.has_type_handler(_Lazy):
        ocp.type_handlers.register_type_handler(_Lazy, _LazyHandler(), override=True)


def _zeros(shape, dtype) -> _Lazy:
    shape, dtype = tuple(shape), np.dtype(dtype)
    return _Lazy(shape, dtype, lambda: np.zeros(shape, dtype))


# ==== HF -> orbax =====================================================================================

@dataclasses.dataclass(frozen=True)
class ImportReport:
    config: ModelConfig
    step_dir: str
    n_leaves: int
    largest_leaf_bytes: int
    state_bytes: int


def _read_hf(hf_dir: str, param_dtype: str):
    """config, plan, specs, checkpoint, fp8 block: every check of hf.load_pretrained, nothing read yet."""
    raw = hf._read_raw_config(hf_dir)
    config = ModelConfig.from_hf(raw, param_dtype=param_dtype)
    checkpoint = hf._Checkpoint(hf_dir)
    config = hf._drop_absent_mtp(config, checkpoint)
    plan = hf._plan(config, lambda prefix: f"{prefix}mlp.experts.gate_up_proj" in checkpoint.entries)
    specs = hf._leaf_specs(config)
    block = hf._fp8_block(raw)
    hf._check_names(plan, checkpoint)
    hf._check_shapes(plan, checkpoint, specs, block)
    return config, plan, specs, checkpoint, block


def _build_leaf(slots, checkpoint, spec, block) -> np.ndarray:
    """One of our variables, as hf._build_variables fills it (each HF tensor read as it is copied in)."""
    array = np.zeros(spec.shape, dtype=np.dtype(spec.dtype))
    for s in slots:
        if s.hf_name in checkpoint.entries:
            array[s.index] = hf._to_ours(s.kind, hf._read_real(checkpoint, s.hf_name, block))
    return array


def lazy_variables(hf_dir: str, param_dtype: str = "float32"):
    """(config, {'params', 'moe_bias'} of `_Lazy` leaves) of an HF checkpoint directory, fully checked."""
    config, plan, specs, checkpoint, block = _read_hf(hf_dir, param_dtype)
    variables: dict = {"params": {}, BIAS_COLLECTION: {}}
    for leaf, slots in hf._group_by_leaf(plan, specs).items():
        spec = specs[leaf]
        produce = functools.partial(_build_leaf, slots, checkpoint, spec, block)
        hf._set_leaf(variables, leaf, _Lazy(tuple(spec.shape), np.dtype(spec.dtype), produce))
    return config, variables


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree,
                        is_leaf=lambda x: isinstance(x, _Lazy))


def lazy_train_state(config: ModelConfig, variables: dict, seed: int = 0) -> TrainState:
    """TrainState of `_Lazy` leaves: the converted variables and a fresh (all-zero) AdamW state."""
    tx = make_optimizer(OptimizerConfig())
    params = variables["params"]
    opt_abstract = jax.eval_shape(tx.init, _abstract(params))
    opt_state = jax.tree.map(lambda s: _zeros(s.shape, s.dtype), opt_abstract)
    _, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    rng = np.asarray(jax.random.key_data(state_rng))
    return TrainState(_zeros((), np.int32), params, variables.get(BIAS_COLLECTION, {}), opt_state,
                      _Lazy(rng.shape, rng.dtype, lambda: rng.copy()))


def _manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def import_hf(hf_dir: str, workdir: str, param_dtype: str = "float32", seed: int = 0) -> ImportReport:
    """Write `workdir/checkpoints/0` from the HF checkpoint in `hf_dir` (see the module docstring)."""
    hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
    _register_lazy_handler()
    config, variables = lazy_variables(hf_dir, param_dtype)
    state = lazy_train_state(config, variables, seed)
    ckpt_dir = os.path.join(workdir, CHECKPOINTS)
    if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
        raise ConvertError(f"{ckpt_dir} already holds a checkpoint; convert into an empty --out")
    created = [p for p in (workdir, ckpt_dir) if not os.path.exists(p)]
    meta = {"model": model_signature(config), "tokens_seen": 0, "loss_ema": None, "converted_from": hf_dir}
    data = {FRESH_DATA_KEY: True, "converted_from": hf_dir}
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _Lazy))
    try:
        manager = _manager(ckpt_dir)
        try:
            manager.save(0, force=True, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)))
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
    return ImportReport(config, os.path.join(ckpt_dir, "0"), len(leaves), max(x.nbytes for x in leaves),
                        sum(x.nbytes for x in leaves))


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


def export_hf(ckpt: str, out_hf: str, step: int | None = None,
              max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> ModelConfig:
    """Write the params and routing biases of a pre-training checkpoint as an HF checkpoint directory."""
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
    variables: dict = {}
    context = ts.Context()
    for leaf in hf._leaf_specs(config):
        field = "params" if leaf[0] == "params" else "moe_bias"
        hf._set_leaf(variables, leaf, _open_array(item_dir, ".".join((field,) + leaf[1:]), context))
    hf.save_pretrained(config, variables, out_hf, max_shard_bytes=max_shard_bytes)
    return config
