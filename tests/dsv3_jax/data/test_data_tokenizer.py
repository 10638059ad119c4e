"""Tokenizers: the trained BPE and its cache, HF tokenizer.json files and their EOS, the default corpus."""

import hashlib
import json
import os

import numpy as np
import pytest

from dsv3_jax.data import DataConfig, DataError, load_tokenizer, open_documents
from dsv3_jax.data import _bpe
from dsv3_jax.data._default_corpus import stdlib_sources


def test_bpe_is_trained_once_then_loaded_from_the_cache(tmp_path_factory, corpus_dir, texts, monkeypatch):
    cache_dir = tmp_path_factory.mktemp("cache")    # outside the corpus, which is read recursively
    cfg = DataConfig(path=corpus_dir, bpe_vocab_size=320, cache_dir=str(cache_dir))
    trained = load_tokenizer(cfg)
    assert trained.vocab_size == 320 and trained.decode([trained.eos_id]) == "<|eos|>"
    assert os.listdir(cache_dir) == [os.path.basename(trained.name)]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(_bpe, "train_bpe", no_training)
    cached = load_tokenizer(cfg)
    for text in texts[:5]:
        ids = cached.encode(text)
        np.testing.assert_array_equal(ids, trained.encode(text))
        assert cached.decode(ids) == text
    assert len(cached.encode(texts[0])) < len(texts[0].encode()) / 2, "merges were learned"

    monkeypatch.undo()
    other = load_tokenizer(DataConfig(path=corpus_dir, bpe_vocab_size=300, cache_dir=str(cache_dir)))
    assert other.vocab_size == 300 and len(os.listdir(cache_dir)) == 2


def test_changed_data_trains_a_new_bpe(tmp_path_factory, corpus_dir):
    cfg = DataConfig(path=corpus_dir, bpe_vocab_size=300, cache_dir=str(tmp_path_factory.mktemp("cache")))
    first = load_tokenizer(cfg).name
    with open(os.path.join(corpus_dir, "doc000.txt"), "a") as f:
        f.write("more text\n")
    assert load_tokenizer(cfg).name != first


def save(tokenizer, directory, eos_in_config=None):
    directory.mkdir()
    tokenizer.hf.save(str(directory / "tokenizer.json"))
    if eos_in_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos_in_config}}))
    return str(directory / "tokenizer.json")


def test_hf_tokenizer_file_and_its_eos(tmp_path, tokenizer, texts):
    hf = tokenizer.hf
    hf.add_special_tokens(["</s>", "<|endoftext|>"])
    try:
        plain = load_tokenizer(DataConfig(tokenizer=save(tokenizer, tmp_path / "a")))
        assert plain.eos_token == "<|eos|>"  # a known EOS name, found by looking
        configured = load_tokenizer(DataConfig(tokenizer=save(tokenizer, tmp_path / "b", eos_in_config="</s>")))
        assert configured.eos_token == "</s>" and configured.eos_id == hf.token_to_id("</s>")
        chosen = load_tokenizer(DataConfig(tokenizer=str(tmp_path / "b" / "tokenizer.json"), eos_token="<|endoftext|>"))
        assert chosen.eos_id == hf.token_to_id("<|endoftext|>")
        np.testing.assert_array_equal(chosen.encode(texts[0]), tokenizer.encode(texts[0]))
        with pytest.raises(DataError, match="'<nope>' is not in its vocabulary"):
            load_tokenizer(DataConfig(tokenizer=str(tmp_path / "a" / "tokenizer.json"), eos_token="<nope>"))
    finally:
        tokenizer.hf.__init__ if False else None


def test_default_corpus_is_the_stdlib_and_deterministic():
    sources = stdlib_sources()
    assert sources == stdlib_sources() and sources == sorted(sources)
    assert 300 < len(sources) < 3000
    assert "os.py" in sources and "json/decoder.py" in sources.__str__().replace(os.sep, "/")
    assert not any(part in ("test", "tests", "site-packages") for s in sources for part in s.split(os.sep))
    first, second = open_documents(DataConfig()), open_documents(DataConfig())
    assert len(first) == len(second) > len(sources)  # the sources plus pydoc's topics
    assert first.identity == second.identity
    probe = [0, len(sources) - 1, len(first) - 1]
    digest = [hashlib.sha256(first[i].encode()).hexdigest() for i in probe]
    assert digest == [hashlib.sha256(second[i].encode()).hexdigest() for i in probe]
    assert "def " in first[probe[0]] or "import" in first[probe[0]]
