"""Random-access readers of documents, one kind per file format: text, JSONL(.gz), Parquet, ArrayRecord.
A reader is opened (and checked) eagerly, so bad files fail before training starts; `read(j)` returns the j-th
non-empty document of the file as a string.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
from typing import Protocol, Sequence

import numpy as np

from dsv3_jax.data._config import DataError


class Reader(Protocol):
    name: str

    def __len__(self) -> int: ...

    def read(self, j: int) -> str: ...


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class TextFiles:
    """Whole files as documents, one each; empty files are left out."""

    def __init__(self, paths: Sequence[str], name: str = "text files"):
        self.paths = [p for p in paths if os.path.getsize(p) > 0]
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, j: int) -> str:
        with open(self.paths[j], "rb") as f:
            return _decode(f.read())


class Texts:
    """Documents already in memory (the pydoc topics of the default corpus)."""

    def __init__(self, texts: Sequence[str], name: str):
        self.texts = [t for t in texts if t]
        self.name = name

    def __len__(self) -> int:
        return len(self.texts)

    def read(self, j: int) -> str:
        return self.texts[j]


def _text_of(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{where}: no field {field!r}")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


class JsonlFile:
    """One JSON object per line; every line is parsed once here so that a bad one names file:line now.

    Plain files are re-read by byte offset; a .gz file is kept decompressed in memory.
    """

    def __init__(self, path: str, field: str):
        self.name, self.field = path, field
        self.data: bytes | None = None
        if path.endswith(".gz"):
            try:
                with gzip.open(path, "rb") as f:
                    self.data = f.read()
            except (OSError, EOFError) as e:
                raise DataError(f"{path}: not a readable gzip file ({e})") from None
            lines = self.data.splitlines(keepends=True)
        else:
            with open(path, "rb") as f:
                lines = list(f)
        starts, ends, offset = [], [], 0
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{lineno}: not valid JSON") from None
                if _text_of(record, field, f"{path}:{lineno}"):
                    starts.append(offset)
                    ends.append(offset + len(line))
            offset += len(line)
        self.starts, self.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, j: int) -> str:
        start, end = int(self.starts[j]), int(self.ends[j])
        if self.data is not None:
            line = self.data[start:end]
        else:
            with open(self.name, "rb") as f:
                f.seek(start)
                line = f.read(end - start)
        return json.loads(line)[self.field]


class ParquetFile:
    """A string column of a Parquet file, held in memory as an Arrow array (about the size of its text)."""

    def __init__(self, path: str, field: str):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.name = path
        try:
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            if field not in names:
                raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names)})")
            column = parquet.read(columns=[field]).column(field).combine_chunks()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{path}: column {field!r} has type {column.type}, not string")
        lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
        self.column, self.rows = column, np.flatnonzero(lengths > 0)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, j: int) -> str:
        return self.column[int(self.rows[j])].as_py()


class ArrayRecordFile:
    """Records that are UTF-8 text, or JSON objects with the text field (decided by the first record)."""

    def __init__(self, path: str, field: str):
        from array_record.python import array_record_module

        self.name, self.field = path, field
        self.reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
        if not self.reader.ok():
            raise DataError(f"{path}: not a readable ArrayRecord file")
        self.n = self.reader.num_records()
        self.lock = threading.Lock()
        self.is_json = False
        if self.n:
            first = self.reader.read([0])[0]
            try:
                record = json.loads(first) if first.lstrip().startswith(b"{") else None
            except ValueError:
                record = None
            if isinstance(record, dict):
                self.is_json = True
                _text_of(record, field, f"{path}: record 0")

    def __len__(self) -> int:
        return self.n

    def read(self, j: int) -> str:
        with self.lock:
            raw = self.reader.read([j])[0]
        if not self.is_json:
            return _decode(raw)
        try:
            record = json.loads(raw)
        except ValueError:
            raise DataError(f"{self.name}: record {j}: not valid JSON") from None
        return _text_of(record, self.field, f"{self.name}: record {j}")


def open_file(path: str, field: str) -> Reader:
    """The reader for `path`, by its extension; anything unrecognised is one plain-text document."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return JsonlFile(path, field)
    if lower.endswith(".parquet"):
        return ParquetFile(path, field)
    if lower.endswith((".arrayrecord", ".array_record")):
        return ArrayRecordFile(path, field)
    return TextFiles([path], name=path)
