"""checkpoint.init_from: a run starts from another run's parameters, routing biases and AdamW state at step 0, under
a model that may differ in its position handling only (others are refused); the other run's directory is only
read; once the run has checkpoints of its own it resumes from them."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import get_preset
from dsv3_jax.io.checkpoint import Checkpointer, CheckpointMismatch, model_signature
from dsv3_jax.config import ConfigError
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.step import create_train_state
from experiments import pretrain
from experiments.init_from import InitSource
from tests.experiments.cli_helpers import IN_PROCESS_BATCH, fast_args
from tests.fast_compile import cheap_compiles  # noqa: F401 - autouse fixture

CONFIG = get_preset("tiny").replace(n_layers=2)   # the model of tests.experiments.cli_helpers.fast_args
TX = make_optimizer(OptimizerConfig())


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def newest_state(workdir, like):
    """(step, state) of the newest checkpoint in `workdir`, restored into the structure of `like`."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=1, every=1, use_async=False)
    step = ckpt.latest_step()
    state = ckpt.restore(step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like))[0]
    ckpt.close()
    return step, state


def listing(directory):
    return sorted((root, tuple(sorted(files))) for root, _, files in os.walk(directory))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(workdir, state): a checkpoint at step 7 whose AdamW moments and count are not a fresh optimizer's."""
    workdir = tmp_path_factory.mktemp("source")
    state = jax.jit(create_train_state, static_argnums=(0, 1))(CONFIG, TX, jax.random.PRNGKey(1))
    moved = lambda x: x + (0.25 if jnp.issubdtype(x.dtype, jnp.floating) else 3)
    state = state.replace(step=jnp.int32(7), opt_state=jax.tree.map(moved, state.opt_state))
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=1, every=1, use_async=False)
    ckpt.save(7, state, {}, {"model": model_signature(CONFIG), "tokens_seen": 99}, force=True)
    ckpt.close()
    return workdir, state


def test_a_source_of_another_shape_or_without_checkpoints_is_refused(source, tmp_path):
    with pytest.raises(CheckpointMismatch, match="model.dim=64, this run has model.dim=96"):
        InitSource(str(source[0]), CONFIG.replace(dim=96))
    with pytest.raises(ConfigError, match="no checkpoint"):
        InitSource(str(tmp_path), CONFIG)
    with pytest.raises(ConfigError, match="no such directory"):
        InitSource(str(tmp_path / "missing"), CONFIG)


def test_pretrain_starts_from_init_from_at_step_0_then_resumes_its_own_checkpoints(source, tmp_path, corpus_dir,
                                                                                   capsys):
    """A run with YaRN from the plain-RoPE source (--steps 0: it saves its step-0 state, compiling no train step)."""
    workdir, state = source
    before = listing(workdir)
    extension = ("--set", f"checkpoint.init_from={workdir}", "--set", "model.rope_scaling.factor=4",
                 "--set", "model.rope_scaling.original_max_position_embeddings=32")
    args = fast_args(tmp_path / "run", corpus_dir, tmp_path / "cache", 0, extra=extension, batch=IN_PROCESS_BATCH)
    assert pretrain.main(args) == 0
    assert "initialised from" in capsys.readouterr().out
    step, restored = newest_state(tmp_path / "run", state)
    assert step == 0 and int(restored.step) == 0
    assert_trees_equal(restored.replace(step=state.step), state)
    assert listing(workdir) == before                     # the source is only read
    assert pretrain.main(args) == 0
    assert "resumed from" in capsys.readouterr().out
