"""Byte-level BPE trained on the corpus on first use, cached under cache_dir."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Iterator

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax.data._documents import Documents

EOS_TOKEN = "<|eos|>"
_SETTINGS = {"model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False, "special": [EOS_TOKEN]}


def training_sample(documents: Documents, max_chars: int) -> Iterator[str]:
    """Documents in a fixed pseudo-random order until `max_chars` characters have been given."""
    given = 0
    for i in np.random.default_rng(0).permutation(len(documents)):
        if given >= max_chars:
            return
        text = documents[int(i)]
        given += len(text)
        yield text


def train_bpe(texts: Iterator[str], vocab_size: int) -> tokenizers.Tokenizer:
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return bpe


def cache_path(documents: Documents, vocab_size: int, max_chars: int, cache_dir: str) -> str:
    """Where the BPE for these settings is cached. The key hashes everything that shapes the result (corpus identity,
    vocabulary size, sample size, trainer settings, Python and tokenizers versions), so a second call loads the same
    tokenizer in milliseconds."""
    key = json.dumps({
        "corpus": documents.identity, "vocab_size": vocab_size, "max_chars": max_chars, "settings": _SETTINGS,
        "python": sys.version, "tokenizers": tokenizers.__version__,
    }, sort_keys=True)
    name = f"bpe-{vocab_size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    return os.path.join(os.path.expanduser(cache_dir), name)


def cached_bpe(documents: Documents, vocab_size: int, max_chars: int, cache_dir: str) -> tuple[tokenizers.Tokenizer, str]:
    """The BPE for `documents`, from the cache if there, else trained and written there; and its path."""
    path = cache_path(documents, vocab_size, max_chars, cache_dir)
    if os.path.exists(path):
        try:
            return tokenizers.Tokenizer.from_file(path), path
        except Exception:  # an unreadable cache entry is retrained and replaced
            pass
    bpe = train_bpe(training_sample(documents, max_chars), vocab_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scratch = f"{path}.{os.getpid()}.tmp"  # hosts sharing the cache each write whole files, then rename
    bpe.save(scratch)
    os.replace(scratch, path)
    return bpe, path
