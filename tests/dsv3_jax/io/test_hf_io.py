"""Checkpoint I/O without the transformers oracle: FP8 block dequantization, sharded checkpoints with an
index, MTP tensors, bfloat16, transformers' fused expert names, and the one-line CheckpointErrors for
missing / unexpected / mis-shaped tensors and truncated files."""

from __future__ import annotations

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

from dsv3_jax import ModelConfig
from dsv3_jax.io.hf import CheckpointError, INDEX_FILE, load_pretrained, save_pretrained
from pallas_kernels.fp8 import dequantize
from tests.hf_oracle import flat, load_quietly, random_variables

# Some Linear shapes exceed 128 and none is a multiple of it: wkv_b (160, 36), mlp gate/up (200, 48), down (48, 200).
CONFIG = ModelConfig(
    vocab_size=160, dim=48, n_layers=2, first_k_dense_replace=1, n_heads=4, q_lora_rank=40, kv_lora_rank=36,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=24, intermediate_size=200,
    max_position_embeddings=64, num_mtp_modules=1, dtype="float32")
MTP = f"model.layers.{CONFIG.n_layers}."
FP8_MAX = 448.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(variables, directory) of CONFIG saved by save_pretrained as one model.safetensors."""
    variables = random_variables(CONFIG, seed=0)
    directory = tmp_path_factory.mktemp("saved")
    save_pretrained(CONFIG, variables, directory)
    return variables, directory


def assert_same_variables(got, want) -> None:
    got_leaves, want_leaves = flat(got), flat(want)
    assert set(got_leaves) == set(want_leaves)
    for path, array in want_leaves.items():
        assert got_leaves[path].dtype == array.dtype, "/".join(path)
        np.testing.assert_array_equal(got_leaves[path], array, err_msg="/".join(path))


def rewrite(source, target, edit) -> str:
    """Copy a single-file checkpoint, passing its {name: array} through `edit`; returns the new weights file."""
    os.makedirs(target, exist_ok=True)
    shutil.copy(os.path.join(source, "config.json"), target)
    tensors = edit(safetensors.numpy.load_file(os.path.join(source, "model.safetensors")))
    path = os.path.join(target, "model.safetensors")
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return path


def load_error(directory) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- round trips ------------------------------------------------------------------------------------

def test_save_load_is_bit_exact_with_mtp(saved):
    variables, directory = saved
    names = set(safetensors.numpy.load_file(os.path.join(directory, "model.safetensors")))
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "mlp.gate.e_score_correction_bias", "mlp.experts.3.down_proj.weight"):
        assert MTP + suffix in names
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names
    config, loaded = load_pretrained(directory, dtype="float32")
    assert config == CONFIG
    assert_same_variables(loaded, variables)
    assert loaded["moe_bias"]["mtp_0"]["block"]["moe"]["router"]["bias"].shape == (CONFIG.n_routed_experts,)


def test_sharded_checkpoint_with_index_loads(saved, tmp_path):
    variables, _ = saved
    save_pretrained(CONFIG, variables, tmp_path, max_shard_bytes=40_000)
    with open(tmp_path / INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
    _, loaded = load_pretrained(tmp_path, dtype="float32")
    assert_same_variables(loaded, variables)


def test_bfloat16_checkpoint_roundtrips(saved, tmp_path):
    config = CONFIG.replace(param_dtype="bfloat16")
    variables = random_variables(config, seed=1)
    save_pretrained(config, variables, tmp_path)
    header = read_header(tmp_path / "model.safetensors")
    assert header["lm_head.weight"]["dtype"] == "BF16"
    assert header[MTP + "mlp.gate.e_score_correction_bias"]["dtype"] == "F32"
    loaded_config, loaded = load_pretrained(tmp_path, param_dtype="bfloat16")
    assert loaded_config.param_dtype == "bfloat16"
    assert_same_variables(loaded, variables)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_compute_dtype_follows_the_checkpoint(tmp_path, stored):
    """dtype="auto" (the default) is config.json's torch_dtype, else the weights' dtype; an explicit dtype wins."""
    config = CONFIG.replace(param_dtype=stored)
    save_pretrained(config, random_variables(config, seed=1), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == stored
    assert load_pretrained(tmp_path)[0].dtype == stored
    assert load_pretrained(tmp_path, dtype="float16")[0].dtype == "float16"
    config_json = json.loads((tmp_path / "config.json").read_text())
    del config_json["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps({**config_json, "dtype": "float16"}))   # transformers 5's key
    assert load_pretrained(tmp_path)[0].dtype == "float16"
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    assert load_pretrained(tmp_path)[0].dtype == stored


def test_fused_expert_names_load(saved, tmp_path):
    """transformers' in-memory layout: experts.gate_up_proj (E, 2F, D) gate first, experts.down_proj (E, D, F)."""
    variables, directory = saved

    def fuse(tensors):
        for layer in (1, CONFIG.n_layers):
            prefix = f"model.layers.{layer}.mlp.experts."
            per_expert = lambda j, p: tensors.pop(f"{prefix}{j}.{p}_proj.weight")
            experts = range(CONFIG.n_routed_experts)
            gate, up, down = ([per_expert(j, p) for j in experts] for p in ("gate", "up", "down"))
            tensors[prefix + "gate_up_proj"] = np.concatenate([np.stack(gate), np.stack(up)], axis=1)
            tensors[prefix + "down_proj"] = np.stack(down)
        return tensors

    rewrite(directory, tmp_path, fuse)
    _, loaded = load_pretrained(tmp_path, dtype="float32")
    assert_same_variables(loaded, variables)


def test_missing_mtp_tensors_drop_mtp_with_one_warning(saved, tmp_path):
    variables, directory = saved
    rewrite(directory, tmp_path, lambda t: {k: v for k, v in t.items() if not k.startswith(MTP)})
    (config, loaded), warned = load_quietly(load_pretrained, tmp_path, dtype="float32")
    assert config.num_mtp_modules == 0
    assert len(warned) == 1 and "MTP" in warned[0]
    without_mtp = {c: {k: v for k, v in tree.items() if not k.startswith("mtp_")} for c, tree in variables.items()}
    assert_same_variables(loaded, without_mtp)


# ---- FP8 ----------------------------------------------------------------------------------------------

def quantize_blockwise(weight: np.ndarray, block: int = 128):
    """Reference e4m3 quantization: one scale (amax / 448) per block × block tile."""
    rows, cols = -(-weight.shape[0] // block), -(-weight.shape[1] // block)
    scale = np.zeros((rows, cols), np.float32)
    quantized = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = max(float(np.abs(tile).max()), 1e-4) / FP8_MAX
            quantized[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).astype(
                ml_dtypes.float8_e4m3fn)
    return quantized, scale


def reference_dequantize(quantized: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    expanded = np.kron(scale, np.ones((block, block), np.float32))[: quantized.shape[0], : quantized.shape[1]]
    return quantized.astype(np.float32) * expanded


def is_quantized(name: str, array: np.ndarray) -> bool:
    """DeepSeek's FP8 checkpoints quantize the Linear layers, not the embedding, head, router or norms."""
    return array.ndim == 2 and name.endswith("_proj.weight")


def test_fp8_checkpoint_is_dequantized(saved, tmp_path):
    _, directory = saved
    tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
    fp8, dequantized, scale_shapes = {}, {}, []
    for name, array in tensors.items():
        if is_quantized(name, array):
            quantized, scale = quantize_blockwise(array)
            fp8[name] = safetensors.torch.torch.from_numpy(quantized.view(np.uint8)).view(
                safetensors.torch.torch.float8_e4m3fn)
            fp8[name + "_scale_inv"] = safetensors.torch.torch.from_numpy(scale)
            dequantized[name] = reference_dequantize(quantized, scale)
            scale_shapes.append(scale.shape)
        else:
            fp8[name] = safetensors.torch.torch.from_numpy(array)
            dequantized[name] = array
    assert (2, 1) in scale_shapes and (1, 2) in scale_shapes     # edge blocks are cropped on both axes
    config_json = json.loads((directory / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    for sub, weights in (("fp8", fp8), ("reference", dequantized)):
        os.makedirs(tmp_path / sub)
        (tmp_path / sub / "config.json").write_text(json.dumps(config_json))
    safetensors.torch.save_file(fp8, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    safetensors.numpy.save_file(dequantized, tmp_path / "reference" / "model.safetensors", metadata={"format": "pt"})

    _, from_fp8 = load_pretrained(tmp_path / "fp8", dtype="float32")
    _, reference = load_pretrained(tmp_path / "reference", dtype="float32")
    assert_same_variables(from_fp8, reference)
    name = "model.layers.0.mlp.down_proj.weight"
    q, s = quantize_blockwise(tensors[name])
    np.testing.assert_array_equal(dequantize(q, s, (128, 128)), reference_dequantize(q, s))
    # Without a dtype in config.json the weights decide, FP8 ones counting as bfloat16 (as transformers computes them).
    del config_json["torch_dtype"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config_json))
    assert load_pretrained(tmp_path / "fp8")[0].dtype == "bfloat16"


# ---- errors -------------------------------------------------------------------------------------------

def read_header(path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


def test_missing_tensor(saved, tmp_path):
    rewrite(saved[1], tmp_path, lambda t: {k: v for k, v in t.items() if k != KV_B})
    message = load_error(tmp_path)
    assert KV_B in message and "model.safetensors" in message and "missing" in message


def test_unexpected_tensor(saved, tmp_path):
    extra = "model.layers.1.mlp.extra_proj.weight"
    rewrite(saved[1], tmp_path, lambda t: {**t, extra: np.zeros((3, 3), np.float32)})
    message = load_error(tmp_path)
    assert extra in message and "model.safetensors" in message and "unexpected" in message


def test_ignorable_buffers_are_not_unexpected(saved, tmp_path):
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite(saved[1], tmp_path, lambda t: {**t, buffer: np.ones(4, np.float32)})
    _, loaded = load_pretrained(tmp_path, dtype="float32")
    assert_same_variables(loaded, saved[0])


@pytest.mark.parametrize("name", [KV_B, MTP + "shared_head.head.weight",
                                  "model.layers.1.mlp.gate.e_score_correction_bias"])
def test_misshaped_tensor(saved, tmp_path, name):
    wider = lambda shape: shape[:-1] + (shape[-1] + 1,)
    rewrite(saved[1], tmp_path, lambda t: {**t, name: np.zeros(wider(t[name].shape), np.float32)})
    message = load_error(tmp_path)
    assert name in message and "model.safetensors" in message and "shape" in message


def test_sharded_missing_tensor_names_its_shard(saved, tmp_path):
    save_pretrained(CONFIG, saved[0], tmp_path, max_shard_bytes=40_000)
    shard = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"][KV_B]
    tensors = safetensors.numpy.load_file(tmp_path / shard)
    del tensors[KV_B]
    safetensors.numpy.save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    message = load_error(tmp_path)
    assert KV_B in message and shard in message


def test_truncated_file(saved, tmp_path):
    shutil.copytree(saved[1], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    header = read_header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    os.truncate(path, os.path.getsize(path) - 10)
    message = load_error(tmp_path)
    assert last in message and "model.safetensors" in message and "truncated" in message
    os.truncate(path, 5)
    message = load_error(tmp_path)
    assert "model.safetensors" in message and "truncated" in message


def test_corrupt_header(saved, tmp_path):
    shutil.copytree(saved[1], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#not json")
    message = load_error(tmp_path)
    assert "model.safetensors" in message and "corrupt" in message


def test_fp8_weight_needs_a_matching_scale(saved, tmp_path):
    torch = safetensors.torch.torch
    tensors = {k: torch.from_numpy(v) for k, v in
               safetensors.numpy.load_file(os.path.join(saved[1], "model.safetensors")).items()}
    tensors[KV_B] = tensors[KV_B].to(torch.float8_e4m3fn)
    os.makedirs(tmp_path / "a")
    shutil.copy(saved[1] / "config.json", tmp_path / "a")
    safetensors.torch.save_file(tensors, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    message = load_error(tmp_path / "a")
    assert KV_B in message and "weight_scale_inv" in message
    tensors[KV_B + "_scale_inv"] = torch.ones(1, 1)     # (160, 36) needs (2, 1) blocks
    safetensors.torch.save_file(tensors, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    message = load_error(tmp_path / "a")
    assert KV_B + "_scale_inv" in message and "[2, 1]" in message


class Unreadable:
    """A leaf of the right shape whose values cannot be read, as if the disk failed while saving it."""

    def __init__(self, array):
        self.shape = array.shape

    def __getitem__(self, index):
        raise OSError("disk full")


def test_failed_save_leaves_the_earlier_checkpoint_intact(saved, tmp_path):
    variables, _ = saved
    save_pretrained(CONFIG, variables, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # MTP's head norm is written late (HF order), into the last shard: earlier shards are already written.
    mtp = variables["params"]["mtp_0"]
    failing = {**variables, "params": {**variables["params"], "mtp_0": {
        **mtp, "head_norm": {**mtp["head_norm"], "scale": Unreadable(mtp["head_norm"]["scale"])}}}}
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(CONFIG, failing, tmp_path, max_shard_bytes=40_000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # no staging folder left either
    _, loaded = load_pretrained(tmp_path, dtype="float32")
    assert_same_variables(loaded, variables)
    save_pretrained(CONFIG, variables, tmp_path, max_shard_bytes=40_000)      # a resave replaces, never mixes
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / INDEX_FILE).exists()
