"""Documents: every document of the data set, numbered 0..n-1 in a fixed order and read by number.

This is the random-access source that grain shards, shuffles and tokenizes.
"""

from __future__ import annotations

import bisect
import hashlib
import os

import numpy as np

from dsv3_jax.data._config import DataConfig, DataError
from dsv3_jax.data._default_corpus import default_readers
from dsv3_jax.data._files import list_files
from dsv3_jax.data._formats import Reader, TextFiles, open_file


class Documents:
    def __init__(self, readers: list[Reader], identity: str, name: str):
        self.readers = [r for r in readers if len(r)]
        self.starts = np.cumsum([0] + [len(r) for r in self.readers]).tolist()
        self.identity, self.name = identity, name

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        return self.readers[k].read(i - self.starts[k])


def _user_readers(files: list[str], field: str) -> list[Reader]:
    readers, texts = [], []
    for path in files:
        reader = open_file(path, field)
        if isinstance(reader, TextFiles):
            texts.append(path)  # consecutive text files share one reader
            continue
        if texts:
            readers.append(TextFiles(texts))
            texts = []
        readers.append(reader)
    if texts:
        readers.append(TextFiles(texts))
    return readers


def _files_identity(files: list[str], field: str) -> str:
    digest = hashlib.sha256(f"field {field}\n".encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return "files-" + digest.hexdigest()[:16]


def open_documents(cfg: DataConfig) -> Documents:
    """The documents `cfg.path` names (the default corpus when None); raises DataError if there are none."""
    if cfg.path is None:
        readers, identity = default_readers()
        documents = Documents(readers, identity, "the default corpus")
    else:
        files = list_files(cfg.path)
        documents = Documents(_user_readers(files, cfg.text_field), _files_identity(files, cfg.text_field), cfg.path)
        if not len(documents):
            raise DataError(f"data path {cfg.path!r}: all {len(files)} file(s) hold only empty documents")
    return documents
