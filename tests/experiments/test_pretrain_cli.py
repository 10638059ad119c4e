"""The pre-training command: a short run whose loss falls and whose logs, TensorBoard events and plots
appear; and every kind of bad input rejected with exit code 2, one line, and checkpoints left alone."""

import hashlib
import json
import os

import pytest

from experiments import plot, pretrain
from tests.experiments.cli_helpers import IN_PROCESS_BATCH, fast_args, run_cli

STEPS = 30
LOSS_DROP = 0.35        # the last five losses average at least 35% below the first one


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    """(workdir, cache) of a finished 30-step tiny run."""
    root = tmp_path_factory.mktemp("trained")
    workdir, cache = root / "run", root / "cache"
    result = run_cli(fast_args(workdir, corpus_dir, cache, STEPS,
                               extra=("--set", "logging.tensorboard=true", "--set", f"schedule.decay={STEPS}")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: step 30" in result.stdout
    return workdir, cache


def records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_loss_falls_by_the_stated_margin(trained):
    rows = [r for r in records(trained[0]) if "event" not in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < (1 - LOSS_DROP) * first, (first, last)


def test_metrics_tensorboard_and_plots(trained):
    workdir = trained[0]
    row = records(workdir)[-1]
    for key in ("step", "loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in row, key
    assert row["tokens_per_s"] > 0 and row["mtp_loss"] > 0 and row["grad_norm"] > 0
    violations = row["expert_load_violation"]
    assert len(violations) == 1 and violations[0] >= 0          # 2 layers, the first dense: one MoE layer
    events = [f for _, _, files in os.walk(workdir / "tensorboard") for f in files if "tfevents" in f]
    assert events
    assert plot.main([str(workdir)]) == 0
    for name in ("loss.png", "expert_load.png"):
        assert (workdir / name).stat().st_size > 1000


def checkpoint_digest(workdir):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(workdir / "checkpoints")):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def bad_input_cases(corpus, empty_dir, tokenizer_300):
    return {
        "unknown_preset": (["--config", "huge"], "'huge' is not a preset"),
        "unknown_field": (["--set", "model.n_layerz=3"], "model.n_layerz"),
        "unknown_section": (["--set", "modle.dim=3"], "modle"),
        "wrong_type": (["--set", "train.steps=many"], "train.steps"),
        "missing_data": (["--data", "/nonexistent/corpus"], "/nonexistent/corpus"),
        "empty_data": (["--data", str(empty_dir)], str(empty_dir)),
        "token_id_beyond_vocab": (["--tokenizer", tokenizer_300, "--set", "model.vocab_size=256"],
                                  "model.vocab_size=256"),
        "seq_len_above_max_positions": (["--set", "data.seq_len=100000"], "model.max_position_embeddings"),
        "impossible_model": (["--set", "model.topk_group=9"], "topk_group"),
        "mesh_larger_than_devices": (["--set", "mesh.data=2"], "mesh: data=2 uses 2 devices"),
        "layers_not_divisible_into_stages": (["--set", "mesh.pipeline=3"], "mesh.pipeline=3"),
        "unknown_pipeline_schedule": (["--set", "mesh.pipeline=2", "--set", "train.pipeline_schedule=zb"], "'zb'"),
        "missing_hf_config": (["--hf-config", "/nonexistent/model"], "/nonexistent/model"),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("bad")
    empty = root / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    from tokenizers import Tokenizer
    cache = trained[1]
    tokenizer_path = str(root / "tokenizer.json")
    Tokenizer.from_file(next(str(p) for p in cache.iterdir() if p.suffix == ".json")).save(tokenizer_path)
    return empty, tokenizer_path


@pytest.mark.parametrize("case", ["unknown_preset", "unknown_field", "unknown_section", "wrong_type", "missing_data",
                                  "empty_data", "token_id_beyond_vocab", "seq_len_above_max_positions",
                                  "impossible_model", "mesh_larger_than_devices", "layers_not_divisible_into_stages",
                                  "unknown_pipeline_schedule", "missing_hf_config"])
def test_bad_input_exits_2_with_one_line_and_keeps_checkpoints(case, trained, inputs, corpus_dir, capsys):
    workdir, cache = trained
    before = checkpoint_digest(workdir)
    overrides, expected = bad_input_cases(corpus_dir, *inputs)[case]
    args = fast_args(workdir, corpus_dir, cache, STEPS + 5, batch=IN_PROCESS_BATCH) + overrides
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert checkpoint_digest(workdir) == before


def test_checkpoint_of_another_model_shape_is_refused(trained, corpus_dir, capsys):
    workdir, cache = trained
    before = checkpoint_digest(workdir)
    assert pretrain.main(fast_args(workdir, corpus_dir, cache, STEPS + 5, extra=("--set", "model.dim=96"),
                                   batch=IN_PROCESS_BATCH)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.dim" in err and "--workdir" in err, err
    assert checkpoint_digest(workdir) == before


def test_the_real_command_exits_2_without_a_traceback(tmp_path, corpus_dir):
    result = run_cli(fast_args(tmp_path / "run", corpus_dir, tmp_path / "cache", 3, extra=("--set", "optimizer.b3=1")))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "optimizer.b3" in result.stderr


def test_help_lists_presets_and_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "tiny, small, v2-lite-16b, v2-236b, v3-671b" in out
    for field in ("model.kv_lora_rank", "data.seq_len", "optimizer.b2", "schedule.warmup", "loss.mtp_weight",
                  "balance.gamma", "checkpoint.every", "logging.every", "mesh.expert", "train.on_nonfinite"):
        assert field in out, field
