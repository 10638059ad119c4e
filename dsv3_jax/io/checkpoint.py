"""Training checkpoints with orbax: the train state, the data-iterator state and run metadata. Before restoring, the
stored model config is compared with the running one: another model's checkpoint is refused, naming the first field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from dsv3_jax.model import fp8_weights

# ModelConfig fields that only choose an implementation; a checkpoint restores across them.
_FREE_FIELDS = {"scan_layers", "remat_policy", "attention_impl", "kernels", "kernel_target", "dtype", "fp8", "fp8_power_of_two_scales"}


FRESH_DATA_KEY = "fresh"   # a data item {"fresh": true} (a converted checkpoint): start the data stream afresh


class CheckpointMismatch(ValueError):
    """The checkpoint on disk was written for a different model than the one being run."""


def model_signature(model_config) -> dict[str, Any]:
    """The model's shape-defining fields, as they read back from JSON."""
    fields = dataclasses.asdict(model_config)
    return json.loads(json.dumps({k: v for k, v in fields.items() if k not in _FREE_FIELDS}))


class Checkpointer:
    """Step directories under `directory`. Each is written asynchronously and committed atomically by orbax, so a
    directory that a crash left half-written is never listed, never restored, and cleaned up on the next start."""

    def __init__(self, directory: str, keep: int, every: int, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every, 1), create=True,
            enable_async_checkpointing=use_async, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Start saving (returns at once when async); False when `step` is not a save step."""
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, model_config) -> dict:
        """Return the metadata of `step`, or raise CheckpointMismatch naming the first differing field."""
        meta = self.read_meta(step)
        saved = meta.get("model", {})
        current = model_signature(model_config)
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                raise CheckpointMismatch(
                    f"checkpoint {self.directory}/{step} was written for model.{key}={saved.get(key)!r}, "
                    f"this run has model.{key}={current.get(key)!r}; use another --workdir")
        return meta

    def restore(self, step: int, abstract_state):
        """(state, data_state, meta) of `step`; arrays placed like `abstract_state`'s shardings. Weights that an
        FP8 conversion kept as float8 (dsv3_jax.model.fp8_weights) come back dequantised into the master dtype."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
        if meta.get(fp8_weights.SCALES_ITEM):
            item = fp8_weights.SCALES_ITEM
            scales = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))[item]
            state = state.replace(params=fp8_weights.dequantize_params(state.params, scales))
        return state, restored["data"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

