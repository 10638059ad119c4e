"""Helpers of the data tests: a small synthetic corpus, file writers in each format, stream checkers."""

from __future__ import annotations

import gzip
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter

from dsv3_jax.data import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_texts(n: int = 24, seed: int = 0) -> list[str]:
    """Documents of 1 to ~120 words, so some fit many to a row and some span several rows."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 120)))
        texts.append(f"doc{i} " + " ".join(words) + f". end{i}\n")
    return texts


def write_jsonl(path, texts, field="text"):
    lines = [json.dumps({"id": i, field: t}) for i, t in enumerate(texts)]
    lines.insert(1, "")  # blank lines are skipped
    data = ("\n".join(lines) + "\n").encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def write_parquet(path, texts, field="text"):
    pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=5)


def write_arrayrecord(path, texts, as_json):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for t in texts:
        writer.write(json.dumps({"text": t}).encode() if as_json else t.encode())
    writer.close()


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, n))


def rows_of(batches) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in ("tokens", "segment_ids", "positions")}


def check_row_invariants(batch: dict[str, np.ndarray], rows: int, seq_len: int, eos_id: int) -> None:
    """What the model and loss rely on: segments 1, 2, ... then padding 0; positions restart per segment."""
    for key in ("tokens", "segment_ids", "positions"):
        assert batch[key].shape == (rows, seq_len) and batch[key].dtype == np.int32, key
    for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
        used = int(np.count_nonzero(seg))
        assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0), "padding only at the tail"
        assert np.all(tokens[used:] == 0) and np.all(pos[used:] == 0)
        if used == 0:
            continue
        assert seg[0] == 1 and set(np.diff(seg[:used]).tolist()) <= {0, 1}, "segments count up by one"
        starts = np.r_[True, np.diff(seg[:used]) != 0]
        assert np.all(pos[:used][starts] == 0), "positions restart at each segment"
        assert np.all(np.diff(pos[:used])[~starts[1:]] == 1), "positions step by one inside a segment"
        ends = np.r_[starts[1:], True]
        is_eos = tokens[:used] == eos_id
        assert not np.any(is_eos & ~ends), "EOS only ends a segment"
        assert np.all(is_eos[ends][:-1]), "every segment but the row's last ends in EOS"


def stream_tokens(rows: dict[str, np.ndarray]) -> np.ndarray:
    """All non-padding tokens in row order."""
    return rows["tokens"][rows["segment_ids"] > 0]


def document_order(stream: np.ndarray, documents: list[np.ndarray]) -> list[int]:
    """Which document (tokens + EOS) follows which in `stream`; fails if the stream is not such a sequence."""
    order, at = [], 0
    while at < len(stream):
        matches = [d for d, doc in enumerate(documents)
                   if len(doc) <= len(stream) - at and np.array_equal(stream[at:at + len(doc)], doc)]
        assert len(matches) == 1, f"no single document matches the stream at token {at}"
        order.append(matches[0])
        at += len(documents[matches[0]])
    return order


def encoded(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.r_[tokenizer.encode(t), tokenizer.eos_id].astype(np.int32) for t in texts]
