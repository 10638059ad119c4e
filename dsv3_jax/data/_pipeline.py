"""make_batch_iterator: documents -> tokens + EOS -> packed seq_len rows -> shuffled -> batches, in grain."""

from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np

from dsv3_jax.data._config import DataConfig, DataError
from dsv3_jax.data._documents import Documents, open_documents
from dsv3_jax.data._row_shuffle import RowShuffleIterDataset
from dsv3_jax.data._tokenizer import Tokenizer

STATE_VERSION = 1


class _EncodeDocument:
    """One document's text -> {"tokens": int32[n + 1]}, ending in EOS."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_1 = np.array([tokenizer.eos_id], np.int32)

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        return {"tokens": np.concatenate([self.tokenizer.encode(text), self.eos_1])}


def _seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _as_tuples(tree: Any) -> Any:
    """JSON turns grain's tuples into lists; grain compares them with tuples, so turn them back."""
    if isinstance(tree, dict):
        return {k: _as_tuples(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return tuple(_as_tuples(v) for v in tree)
    return tree


class BatchIterator:
    """Yields {"tokens", "segment_ids", "positions"}: int32[rows, seq_len]; get_state/set_state resume exactly."""

    def __init__(self, rows_dataset: grain.IterDataset, rows: int, seq_len: int, fingerprint: dict[str, Any]):
        self._batches = iter(rows_dataset.batch(rows, drop_remainder=False))
        self.rows, self.seq_len, self.fingerprint = rows, seq_len, fingerprint

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        packed = next(self._batches)
        batch = {
            "tokens": packed["tokens"],
            "segment_ids": packed["tokens_segment_ids"],
            "positions": packed["tokens_positions"],
        }
        missing = self.rows - len(batch["tokens"])
        if missing:
            batch = {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        """Plain JSON data (a few hundred bytes): where the stream is, and the settings it belongs to."""
        return {"version": STATE_VERSION, "config": dict(self.fingerprint),
                "grain": json.loads(json.dumps(self._batches.get_state()))}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"iterator state has version {state.get('version')}, expected {STATE_VERSION}")
        for key, value in self.fingerprint.items():
            if state["config"].get(key) != value:
                raise DataError(
                    f"iterator state was saved with {key}={state['config'].get(key)!r}, this iterator has {value!r}"
                )
        self._batches.set_state(_as_tuples(state["grain"]))


def _check_layout(cfg: DataConfig, process_index: int, process_count: int) -> None:
    cfg.validate()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise DataError(f"batch_size {cfg.batch_size} is not divisible by process_count {process_count}")


def make_batch_iterator(
    cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1,
    documents: Documents | None = None,
) -> BatchIterator:
    """This process's stream of packed batches of cfg.batch_size // process_count rows of cfg.seq_len tokens.

        tokenizer = load_tokenizer(cfg)
        it = make_batch_iterator(cfg, tokenizer, process_index, process_count)
        batch = next(it)  # {"tokens", "segment_ids", "positions"}: int32[batch_size // process_count, seq_len]

    Per process:
      1. shard: every process_count-th document from process_index on (document-level, deterministic);
      2. shuffle the shard's documents, a fresh order each epoch (grain folds the epoch into the seed), repeat;
      3. read and tokenize each document in grain's reader threads, appending EOS;
      4. concatenate and split into rows of seq_len (grain's ConcatThenSplit): each document, or each chunk of
         a longer one, is a segment numbered 1, 2, ... within its row, with positions restarting at 0;
      5. shuffle rows within a window, so one long document's chunks spread over many batches;
      6. batch; a short final batch (finite num_epochs only) is filled with padding rows (segment 0).
    """
    _check_layout(cfg, process_index, process_count)
    documents = documents if documents is not None else open_documents(cfg)
    if len(documents) < process_count:
        raise DataError(f"{documents.name}: {len(documents)} document(s) cannot be shared by {process_count} processes")

    texts = grain.MapDataset.source(documents)[process_index::process_count]
    if cfg.shuffle:
        texts = texts.shuffle(seed=_seed(cfg.seed, 0))
    tokens = texts.repeat(cfg.num_epochs).map(_EncodeDocument(tokenizer))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_documents)
    rows = grain.experimental.ConcatThenSplitIterDataset(
        tokens.to_iter_dataset(read), length_struct={"tokens": cfg.seq_len}
    )
    if cfg.shuffle and cfg.shuffle_window_rows > 1:
        rows = RowShuffleIterDataset(rows, window_size=cfg.shuffle_window_rows, seed=_seed(cfg.seed, 1))
    fingerprint = {
        "documents": len(documents), "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "shuffle": cfg.shuffle, "shuffle_window_rows": cfg.shuffle_window_rows, "num_epochs": cfg.num_epochs,
        "process_index": process_index, "process_count": process_count,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
    }
    return BatchIterator(rows, cfg.batch_size // process_count, cfg.seq_len, fingerprint)
