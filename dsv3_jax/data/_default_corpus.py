"""The embedded default corpus: the Python standard library's own .py sources plus pydoc's topic texts (about 12 MB).
Needs no download and is the same on every machine with the same Python version: files are listed in sorted order,
and test suites, site-packages and caches are left out.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

from dsv3_jax.data._formats import Reader, Texts, TextFiles

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"})


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources() -> list[str]:
    """Paths of the standard library's .py files relative to its root, sorted."""
    root, found = stdlib_root(), []
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith(".")]
        rel = os.path.relpath(directory, root)
        found += [os.path.normpath(os.path.join(rel, n)) for n in names if n.endswith(".py")]
    return sorted(found)


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def default_readers() -> tuple[list[Reader], str]:
    """Readers of the default corpus and its identity (a hash of Python's version, file names and sizes)."""
    root, sources, topics = stdlib_root(), stdlib_sources(), pydoc_topics()
    paths = [os.path.join(root, s) for s in sources]
    digest = hashlib.sha256(f"python {sys.version_info[:3]}\n".encode())
    for source, path in zip(sources, paths):
        digest.update(f"{source}\t{os.path.getsize(path)}\n".encode())
    for topic in topics:
        digest.update(hashlib.sha256(topic.encode()).digest())
    readers = [TextFiles(paths, name=f"stdlib {root}"), Texts(topics, name="pydoc_data.topics")]
    return readers, "stdlib-" + digest.hexdigest()[:16]
