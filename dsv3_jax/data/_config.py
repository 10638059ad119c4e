"""DataConfig: where the documents come from, how they are tokenized, packed and batched; DataError."""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
    """Data that cannot feed training; the one-line message names the file, line or field at fault."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # file, directory (recursive) or glob; None -> the embedded default corpus
    tokenizer: str | None = None  # an HF tokenizer.json; None -> byte-level BPE trained on the corpus, cached
    bpe_vocab_size: int = 2048  # size of the BPE trained when `tokenizer` is None
    bpe_train_chars: int = 64 * 2**20  # at most this much text (a fixed sample of documents) trains the BPE
    seq_len: int = 128
    batch_size: int = 8  # global rows; each process yields batch_size // process_count of them
    seed: int = 0
    shuffle: bool = True  # documents each epoch, then packed rows within a window
    shuffle_window_rows: int = 512  # rows mixed by the row shuffle, so one long document spreads over batches
    num_epochs: int | None = None  # None -> an endless stream; else the last batch is padded with empty rows
    text_field: str = "text"  # JSONL key / Parquet column / ArrayRecord JSON key
    cache_dir: str = "~/.cache/dsv3_jax"
    eos_token: str | None = None  # None -> the tokenizer's own EOS ("<|eos|>" for the trained BPE)
    read_threads: int = 4  # grain threads that read and tokenize documents ahead of packing
    prefetch_documents: int = 64  # documents those threads keep ready

    def validate(self) -> None:
        if self.seq_len < 2:
            raise DataError(f"data.seq_len must be at least 2 (a token and its target), got {self.seq_len}")
        if self.batch_size < 1:
            raise DataError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"data.num_epochs must be positive or None, got {self.num_epochs}")
        if self.bpe_vocab_size < 257:
            raise DataError(f"data.bpe_vocab_size must cover the 256 bytes and EOS (>= 257), got {self.bpe_vocab_size}")
        if self.read_threads < 1 or self.prefetch_documents < 1:
            raise DataError("data.read_threads and data.prefetch_documents must be positive")
