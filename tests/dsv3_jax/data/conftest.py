"""Fixtures of the data tests: the synthetic corpus, a small BPE trained on it, the corpus as .txt files."""

from __future__ import annotations

import pytest
from data_testing import make_texts

from dsv3_jax.data import Tokenizer
from dsv3_jax.data._bpe import EOS_TOKEN, train_bpe


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_texts()


@pytest.fixture(scope="session")
def tokenizer(texts) -> Tokenizer:
    return Tokenizer(train_bpe(iter(texts), vocab_size=300), EOS_TOKEN, "test-bpe")


@pytest.fixture
def corpus_dir(tmp_path, texts) -> str:
    """The texts as one .txt file each, named so that sorted order is document order."""
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i:03d}.txt").write_text(text)
    return str(tmp_path)
