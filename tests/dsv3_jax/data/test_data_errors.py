"""Bad data fails at make_batch_iterator / load_tokenizer with a DataError naming the file, line or field."""

import re

import pytest
from data_testing import write_jsonl, write_parquet

from dsv3_jax.data import DataConfig, DataError, load_tokenizer, make_batch_iterator


def fails(cfg, tokenizer, *needles):
    with pytest.raises(DataError) as info:
        make_batch_iterator(cfg, tokenizer)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_missing_path(tmp_path, tokenizer):
    fails(DataConfig(path=str(tmp_path / "nope.txt")), tokenizer, "does not exist", "nope.txt")


def test_glob_without_matches(tmp_path, tokenizer):
    fails(DataConfig(path=str(tmp_path / "*.jsonl")), tokenizer, "matched no files", "*.jsonl")


def test_empty_directory(tmp_path, tokenizer):
    fails(DataConfig(path=str(tmp_path)), tokenizer, "no files", str(tmp_path))


def test_only_empty_documents(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("")
    write_jsonl(tmp_path / "b.jsonl", ["", ""])
    fails(DataConfig(path=str(tmp_path)), tokenizer, "empty", str(tmp_path))


@pytest.mark.parametrize("content, needles", [
    ('{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n', ("a.jsonl:3", "JSON")),      # not JSON
    ('{"text": "fine"}\n{"body": "no text"}\n', ("a.jsonl:2", "'text'")),                   # no text field
    ('{"text": 3}\n', ("a.jsonl:1", "'text'")),                                              # not a string
])
def test_bad_jsonl_line(tmp_path, tokenizer, content, needles):
    (tmp_path / "a.jsonl").write_text(content)
    fails(DataConfig(path=str(tmp_path)), tokenizer, *needles)


def test_unreadable_parquet(tmp_path, tokenizer):
    (tmp_path / "a.parquet").write_text("not parquet")
    fails(DataConfig(path=str(tmp_path)), tokenizer, "a.parquet", "Parquet")


def test_parquet_without_the_column(tmp_path, tokenizer, texts):
    write_parquet(tmp_path / "a.parquet", texts, field="body")
    fails(DataConfig(path=str(tmp_path)), tokenizer, "a.parquet", "'text'")


def test_unreadable_arrayrecord(tmp_path, tokenizer):
    (tmp_path / "a.arrayrecord").write_text("not arrayrecord")
    fails(DataConfig(path=str(tmp_path)), tokenizer, "a.arrayrecord", "ArrayRecord")


def test_batch_not_divisible_by_processes(corpus_dir, tokenizer):
    with pytest.raises(DataError, match=re.escape("batch_size 6 is not divisible by process_count 4")):
        make_batch_iterator(DataConfig(path=corpus_dir, batch_size=6), tokenizer, process_index=0, process_count=4)


@pytest.mark.parametrize("seq_len", [0, 1])
def test_too_short_rows(corpus_dir, tokenizer, seq_len):
    fails(DataConfig(path=corpus_dir, seq_len=seq_len), tokenizer, "seq_len")


def test_more_processes_than_documents(tmp_path, tokenizer, texts):
    (tmp_path / "a.txt").write_text(texts[0])
    with pytest.raises(DataError, match="1 document"):
        make_batch_iterator(DataConfig(path=str(tmp_path), batch_size=2), tokenizer, process_index=1, process_count=2)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer file does not exist.*tok.json"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok.json")))


def test_invalid_tokenizer_file(tmp_path):
    (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="tok.json: not a valid tokenizer.json"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok.json")))
