"""experiments.convert: HF -> pre-training checkpoint -> HF, bit for bit, and clean failure on bad input; an FP8
checkpoint imported with --fp8 keeps its E4M3 weights and scales, which pre-training, export and generation read."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.io import convert
from dsv3_jax.io import hf
from dsv3_jax.io.hf.safetensors import TensorOut, write_safetensors
from dsv3_jax.model import fp8_weights
from dsv3_jax.io.checkpoint import Checkpointer
from dsv3_jax.config.presets import PRESETS
from dsv3_jax.train.optimizer import OptimizerConfig, make_optimizer
from dsv3_jax.train.step import create_train_state
from pallas_kernels.fp8 import dequantize, quantize_128x128
from tests.fast_compile import ROOT, subprocess_env


def random_variables(config, seed=0):
    """Random values (non-zero routing biases included) for every leaf, built one leaf at a time."""
    rng = np.random.default_rng(seed)
    variables = {}
    for leaf, spec in hf.leaf_specs(config).items():
        hf.set_leaf(variables, leaf, rng.standard_normal(spec.shape).astype(spec.dtype))
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


def restore_for_pretraining(config, workdir):
    """(state, data, meta) as pre-training restores step 0 of `workdir`, and the optimizer it builds."""
    tx = make_optimizer(OptimizerConfig())
    abstract = jax.eval_shape(lambda: create_train_state(config, tx, jax.random.PRNGKey(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=3, every=1, use_async=False)
    try:
        assert ckpt.latest_step() == 0
        ckpt.check_compatible(0, config)
        return (*ckpt.restore(0, abstract), tx)
    finally:
        ckpt.close()


@pytest.mark.parametrize("pieces", [False, True], ids=["whole-leaves", "piece-by-piece"])
def test_round_trip(hf_dir, tmp_path, monkeypatch, pieces):
    """Whole leaves (small ones) and, with the thresholds at 0, every leaf written HF tensor by HF tensor / zero
    slab by slab (how a V3-sized stack is written) restore to the same state and export to the same files."""
    if pieces:
        monkeypatch.setattr(convert, "SLICED_WRITE_BYTES", 0)
        monkeypatch.setattr(convert, "ZERO_PIECE_BYTES", 1 << 16)
    config, variables = hf.load_pretrained(hf_dir)
    report = convert.import_hf(hf_dir, tmp_path / "work")
    assert report.largest_leaf_bytes < report.state_bytes
    if pieces:   # one chunk per expert: readers fetch one expert without decompressing the others
        opened = convert.open_checkpoint(str(tmp_path / "work"))
        experts = opened.variables["params"]["moe_layers"]["moe"]["experts_gate"].array
        assert tuple(experts.chunk_layout.write_chunk.shape) == (1, 1, *experts.shape[2:])

    # What pre-training would start from: its abstract state (for restoring), AdamW's fresh state.
    state, data, meta, tx = restore_for_pretraining(config, tmp_path / "work")
    fresh_opt = tx.init(variables["params"])
    fresh_rng = jax.random.key_data(jax.random.split(jax.random.PRNGKey(0))[1])
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
    fast = ["--steps", "2", "--data", corpus_dir, "--set", "data.seq_len=32", "--set", "data.batch_size=8",
            "--set", "data.bpe_vocab_size=300", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "logging.progress=false", "--set", "logging.tensorboard=false", "--set", "logging.every=1"]
    assert pretrain.main(flags + fast) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "done: step 2" in out


# ---- FP8 kept -------------------------------------------------------------------------------------------

def fp8_copy(source, target):
    """An FP8 copy of an HF checkpoint as DeepSeek ships V3: every 2-D `*_proj.weight` as E4M3 with a float32
    `weight_scale_inv` per 128x128 block, everything else as it was."""
    checkpoint = hf.CheckpointTensors(str(source))
    tensors = []
    out = lambda name, array: TensorOut(name, array.shape, array.dtype, lambda: array)
    for name in checkpoint.entries:
        array = checkpoint.read(name)
        if name.endswith("_proj.weight") and array.ndim == 2:
            q, scale = (np.asarray(a) for a in quantize_128x128(array))
            tensors += [out(name, q), out(name + hf.SCALE_SUFFIX, scale)]
        else:
            tensors.append(out(name, array))
    os.makedirs(target)
    write_safetensors(os.path.join(target, hf.SINGLE_FILE), tensors)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (target / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_hf_dir(tmp_path_factory):
    """The tiny preset with a 200-wide dense MLP (its weights span 2 x 1 and 1 x 2 blocks), in FP8."""
    root = tmp_path_factory.mktemp("fp8")
    config = PRESETS["tiny"].replace(intermediate_size=200)
    hf.save_pretrained(config, random_variables(config, seed=1), root / "bf16")
    fp8_copy(root / "bf16", root / "fp8")
    return root / "fp8"


def test_fp8_weights_kept_and_dequantised_by_their_readers(fp8_hf_dir, tmp_path, capsys):
    from experiments import convert as convert_cli
    from experiments.generate import load_train_checkpoint

    config, dequantised = hf.load_pretrained(fp8_hf_dir)   # every FP8 weight dequantised on the way in
    workdir = tmp_path / "work"
    assert convert_cli.main(["--hf-dir", str(fp8_hf_dir), "--out", str(workdir), "--fp8"]) == 0
    assert "weights kept as FP8" in capsys.readouterr().out

    # On disk: HF's E4M3 bytes and scales, transposed; the routers and the embedding stay float32.
    _, kept = load_train_checkpoint(str(workdir), "float32")
    checkpoint = hf.CheckpointTensors(str(fp8_hf_dir))
    up = kept["params"]["dense_layers"]["mlp"]["up"]
    assert up["kernel"].dtype == jnp.float8_e4m3fn and up["kernel_scale"].shape == (1, 1, 2)
    hf_up = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(np.asarray(up["kernel"][0]).view(np.uint8), checkpoint.read(hf_up).T.view(np.uint8))
    np.testing.assert_array_equal(up["kernel_scale"][0], checkpoint.read(hf_up + hf.SCALE_SUFFIX).T)
    moe = kept["params"]["moe_layers"]["moe"]
    assert moe["experts_down"].dtype == jnp.float8_e4m3fn and moe["experts_down_scale"].shape == (2, 8, 1, 1)
    assert moe["router"]["kernel"].dtype == jnp.float32 and "kernel_scale" not in moe["router"]
    assert kept["params"]["embed"]["embedding"].dtype == jnp.float32
    for path in (("dense_layers", "mlp", "up"), ("moe_layers", "attn", "wkv_b"), ("mtp_0", "eh_proj")):
        leaf = functools.reduce(lambda tree, key: tree[key], path, kept["params"])
        want = functools.reduce(lambda tree, key: tree[key], path, dequantised["params"])["kernel"]
        np.testing.assert_array_equal(dequantize(leaf["kernel"], leaf["kernel_scale"], (128, 128)), want)

    # Pre-training restores master weights equal to a dequantising import's; export writes them.
    state, _, meta, _ = restore_for_pretraining(config, workdir)
    assert meta[fp8_weights.SCALES_ITEM] is True
    assert same(state.params, dequantised["params"]) and same(state.moe_bias, dequantised["moe_bias"])
    convert.export_hf(str(workdir), tmp_path / "hf_out")
    assert same(hf.load_pretrained(tmp_path / "hf_out")[1], dequantised)
