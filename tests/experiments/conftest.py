"""Shared set-up for the pre-training CLI tests: a small corpus."""

import pytest


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Forty short English-like documents with repeated structure, so a tiny model learns quickly."""
    d = tmp_path_factory.mktemp("corpus")
    words = "the model routes each token to a few experts and the shared expert sees every token".split()
    for i in range(40):
        body = " ".join(words[(i + j) % len(words)] for j in range(60 + i))
        (d / f"doc_{i:02d}.txt").write_text(f"document {i}. {body}.\n")
    return str(d)
