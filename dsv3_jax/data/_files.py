"""Turns DataConfig.path (a file, a directory searched recursively, or a glob) into a sorted file list."""

from __future__ import annotations

import glob
import os

from dsv3_jax.data._config import DataError


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return found


def list_files(path: str) -> list[str]:
    """Every data file under `path`, sorted, so that document numbering is the same on every host."""
    path = os.path.expanduser(path)
    if glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
        files = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
        if not files:
            raise DataError(f"data path: glob {path!r} matched no files")
    elif os.path.isdir(path):
        files = _walk(path)
        if not files:
            raise DataError(f"data path: directory {path!r} holds no files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data path does not exist: {path!r}")
    return sorted(dict.fromkeys(os.path.abspath(f) for f in files))
