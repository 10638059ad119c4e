"""Each input format reads back the same documents: text files, JSONL(.gz), Parquet, ArrayRecord; dirs and globs."""

import numpy as np
import pytest
from data_testing import write_arrayrecord, write_jsonl, write_parquet

from dsv3_jax.data import DataConfig, make_batch_iterator, open_documents


WRITERS = {
    "data.jsonl": write_jsonl,
    "data.jsonl.gz": write_jsonl,
    "data.parquet": write_parquet,
    "text.arrayrecord": lambda p, t: write_arrayrecord(p, t, as_json=False),
    "json.arrayrecord": lambda p, t: write_arrayrecord(p, t, as_json=True),
}


def read_all(cfg):
    documents = open_documents(cfg)
    return [documents[i] for i in range(len(documents))]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_format_reads_back_its_documents(tmp_path, texts, tokenizer, name):
    WRITERS[name](tmp_path / name, texts)
    cfg = DataConfig(path=str(tmp_path / name), seq_len=32, batch_size=2)
    assert read_all(cfg) == texts
    batch = next(make_batch_iterator(cfg, tokenizer))
    assert batch["tokens"].shape == (2, 32) and np.all(batch["segment_ids"] > 0)


def test_empty_documents_are_left_out(tmp_path, texts):
    write_jsonl(tmp_path / "a.jsonl", ["", texts[0], ""])
    write_parquet(tmp_path / "b.parquet", [texts[1], ""])
    (tmp_path / "c.txt").write_text("")
    (tmp_path / "d.txt").write_text(texts[2])
    assert read_all(DataConfig(path=str(tmp_path))) == texts[:3]


def test_directory_is_read_recursively_in_sorted_order(tmp_path, texts):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a.md").write_text(texts[0])
    (tmp_path / "b" / "deep" / "x.txt").write_text(texts[1])
    write_jsonl(tmp_path / "b" / "y.jsonl", texts[2:4])
    (tmp_path / ".hidden").write_text("not data")
    assert read_all(DataConfig(path=str(tmp_path))) == texts[:4]


def test_glob_selects_matching_files(tmp_path, texts):
    for i in range(4):
        (tmp_path / f"part{i}.txt").write_text(texts[i])
    (tmp_path / "notes.md").write_text("left out")
    assert read_all(DataConfig(path=str(tmp_path / "part*.txt"))) == texts[:4]
    assert read_all(DataConfig(path=str(tmp_path / "**" / "part[13].txt"))) == [texts[1], texts[3]]


def test_other_text_field(tmp_path, texts):
    write_jsonl(tmp_path / "a.jsonl", texts[:3], field="content")
    write_parquet(tmp_path / "b.parquet", texts[3:5], field="content")
    assert read_all(DataConfig(path=str(tmp_path), text_field="content")) == texts[:5]
