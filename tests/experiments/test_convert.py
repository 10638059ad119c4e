"""experiments.convert: HF -> pre-training checkpoint -> HF, bit for bit, and clean failure on bad input."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsv3_jax import convert, hf
from dsv3_jax.checkpoint import Checkpointer
from dsv3_jax.presets import PRESETS
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.step import create_train_state
from tests.fast_compile import ROOT, subprocess_env


def random_variables(config, seed=0):
    """Random values (non-zero routing biases included) for every leaf, built one leaf at a time."""
    rng = np.random.default_rng(seed)
    variables = {}
    for leaf, spec in hf._leaf_specs(config).items():
        hf._set_leaf(variables, leaf, rng.standard_normal(spec.shape).astype(spec.dtype))
    return variables


def same(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "model"
    config = PRESETS["tiny"]
    hf.save_pretrained(config, random_variables(config), directory)
    return directory


def test_round_trip(hf_dir, tmp_path):
    config, variables = hf.load_pretrained(hf_dir)
    report = convert.import_hf(hf_dir, tmp_path / "work")
    assert report.largest_leaf_bytes < report.state_bytes

    tx = make_optimizer(OptimizerConfig())
    # What pre-training would start from: its abstract state (for restoring), AdamW's fresh state.
    abstract = jax.eval_shape(lambda: create_train_state(config, tx, jax.random.PRNGKey(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    fresh_opt = tx.init(variables["params"])
    fresh_rng = jax.random.key_data(jax.random.split(jax.random.PRNGKey(0))[1])
    ckpt = Checkpointer(str(tmp_path / "work" / "checkpoints"), keep=3, every=1, use_async=False)
    try:
        assert ckpt.latest_step() == 0
        ckpt.check_compatible(0, config)
        state, data, meta = ckpt.restore(0, abstract)
    finally:
        ckpt.close()
    assert same(state.params, variables["params"]) and same(state.moe_bias, variables["moe_bias"])
    assert same(state.opt_state, fresh_opt) and int(state.step) == 0 and same(state.rng, fresh_rng)
    assert data[convert.FRESH_DATA_KEY] is True and meta["tokens_seen"] == 0

    convert.export_hf(str(tmp_path / "work"), tmp_path / "hf_out")
    config_back, variables_back = hf.load_pretrained(tmp_path / "hf_out")
    assert config_back == config and same(variables_back, variables)


def test_truncated_file_fails_cleanly(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    path = broken / hf.SINGLE_FILE
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    out = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "experiments.convert", "--hf-dir", str(broken), "--out", str(out)],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "truncated" in lines[0] and hf.SINGLE_FILE in lines[0] and "tensor" in lines[0]
    assert not out.exists()


def test_pretraining_continues_from_a_converted_checkpoint(hf_dir, tmp_path, corpus_dir, capsys):
    from experiments import convert as convert_cli
    from experiments import pretrain

    workdir = tmp_path / "work"
    assert convert_cli.main(["--hf-dir", str(hf_dir), "--out", str(workdir)]) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1].split()
    flags = command[command.index("--workdir"):command.index("[--data")]       # as printed for the user
    fast = ["--steps", "2", "--data", corpus_dir, "--set", "data.seq_len=32", "--set", "data.batch_size=4",
            "--set", "data.bpe_vocab_size=300", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "logging.progress=false", "--set", "logging.tensorboard=false", "--set", "logging.every=1"]
    assert pretrain.main(flags + fast) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "done: step 2" in out
