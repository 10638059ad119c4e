"""`checkpoint.init_from=DIR`: a new run that starts from another run's weights, as DeepSeek-V3's context-extension
stages start from the 4K pre-training (experiments.presets: v3-671b → v3-671b-ext32k → v3-671b-ext128k).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import orbax.checkpoint as ocp

from dsv3_jax.io.checkpoint import Checkpointer, CheckpointMismatch, model_signature
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.io.convert import checkpoints_dir

POSITION_FIELDS = frozenset({"rope_theta", "rope_scaling", "max_position_embeddings"})


class _ReadOnlyCheckpointer(Checkpointer):
    """Checkpointer's reading side on another run's directory: nothing there is created, cleaned up or written."""

    def __init__(self, directory: str):   # no super().__init__: that one opens the directory for writing
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True))


def check_same_parameters(saved_signature: dict, model: ModelConfig, where: str) -> None:
    """CheckpointMismatch naming the first field, other than the position fields, in which the checkpoint's model
    differs from `model`."""
    current = model_signature(model)
    for key in sorted((set(saved_signature) | set(current)) - POSITION_FIELDS):
        if saved_signature.get(key) != current.get(key):
            raise CheckpointMismatch(f"checkpoint.init_from: {where} was written for model.{key}="
                                     f"{saved_signature.get(key)!r}, this run has model.{key}={current.get(key)!r}")


class InitSource:
    """The newest checkpoint under `init_from`, checked against `model` (ConfigError / CheckpointMismatch, one line).

    `init_from` is the other run's --workdir (or its checkpoints/ folder, or a converted checkpoint's); its newest
    checkpoint is read, never written. Carried over: the parameters, the routing biases and the AdamW state (moments
    and their step count: the stage continues the same optimizer, at its own learning rate). Started afresh: the step
    counter (the new run's schedule counts from 0), tokens seen, the data stream and the loss's running mean. The
    models must agree in every field that shapes the parameters; the position fields (RoPE theta, YaRN, max
    positions) may differ, which is what a context extension changes. Used only while the run's own workdir holds
    no checkpoint: a stage that was interrupted resumes from its own checkpoints."""

    def __init__(self, init_from: str, model: ModelConfig):
        directory = checkpoints_dir(os.path.expanduser(init_from))
        if not os.path.isdir(directory):
            raise ConfigError(f"checkpoint.init_from={init_from}: no such directory")
        self.checkpointer = _ReadOnlyCheckpointer(directory)
        self.step = self.checkpointer.latest_step()
        if self.step is None:
            raise ConfigError(f"checkpoint.init_from={init_from}: no checkpoint in {directory}")
        self.where = f"{directory}/{self.step}"
        check_same_parameters(self.checkpointer.read_meta(self.step).get("model", {}), model, self.where)

    def restore(self, abstract_state):
        """The source's train state placed like `abstract_state` (ShapeDtypeStructs with shardings), step 0."""
        state, _, _ = self.checkpointer.restore(self.step, abstract_state)
        self.checkpointer.manager.close()
        return state.replace(step=jnp.zeros_like(state.step))
