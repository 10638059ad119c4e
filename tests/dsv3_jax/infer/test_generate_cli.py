"""`python -m experiments.generate`, in process: from an HF directory and from a pre-training checkpoint,
with a tokenizer (streamed text) and with raw ids; the tokens printed are `generate`'s."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
import tokenizers

from dsv3_jax.io.checkpoint import Checkpointer, model_signature
from dsv3_jax.io.hf import save_pretrained
from dsv3_jax.infer import generate
from dsv3_jax.train.step import TrainState
from experiments.generate import main
from tests.dsv3_jax.infer.test_infer import CACHE_LEN, CONFIG, random_variables

PROMPT = [5, 7, 9]
NEW = 6


@pytest.fixture(scope="module")
def variables():
    return random_variables(CONFIG)


@pytest.fixture(scope="module")
def expected(variables):
    return generate(CONFIG, variables, [PROMPT], NEW, cache_len=CACHE_LEN).tokens[0]


def printed_ids(out: str) -> list[int]:
    return [int(t) for t in out.splitlines()[0].split()][len(PROMPT):]


def test_hf_dir_greedy_and_speculative(tmp_path, variables, expected, capsys):
    save_pretrained(CONFIG, variables, tmp_path / "hf")
    args = ["--hf-dir", str(tmp_path / "hf"), "--prompt-ids", "5,7,9", "--max-new-tokens", str(NEW)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert printed_ids(out) == expected and "tokens/s" in out
    assert main(args + ["--speculative", "mtp", "--draft-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert printed_ids(out) == expected and "MTP acceptance" in out


def test_train_checkpoint_with_tokenizer(tmp_path, variables, expected, capsys):
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=1, every=1, use_async=False)
    state = TrainState(jnp.zeros([], jnp.int32), variables["params"], variables["moe_bias"], {},
                       jnp.zeros((2,), jnp.uint32))
    ckpt.save(7, state, {}, {"model": model_signature(CONFIG), "tokens_seen": 0}, force=True)
    ckpt.close()
    words = [f"w{i}" for i in range(CONFIG.vocab_size - 1)] + ["<|eos|>"]
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))

    assert main(["--ckpt", str(tmp_path / "run"), "--prompt", "w5 w7 w9", "--max-new-tokens", str(NEW),
                 "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].replace(" ", "") == "w5w7w9" + "".join(f"w{t}" for t in expected)

    assert main(["--ckpt", str(tmp_path / "run"), "--prompt", "w5", "--max-new-tokens", "2"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
