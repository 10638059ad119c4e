"""Tokenizer: a `tokenizers.Tokenizer` plus the EOS id that ends every packed document; load_tokenizer.
Any HF tokenizer.json loads (DeepSeek-V3's included); with none given, a byte-level BPE is trained on the corpus and
cached. Text is encoded without special tokens: the packer appends EOS itself.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tokenizers

from dsv3_jax.data._bpe import EOS_TOKEN, cached_bpe
from dsv3_jax.data._config import DataConfig, DataError
from dsv3_jax.data._documents import Documents, open_documents

# Looked for in this order when neither the config nor tokenizer_config.json names the EOS token.
EOS_CANDIDATES = (EOS_TOKEN, "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class Tokenizer:
    def __init__(self, hf: tokenizers.Tokenizer, eos_token: str, name: str):
        eos_id = hf.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer {name}: eos_token {eos_token!r} is not in its vocabulary")
        self.hf, self.eos_token, self.eos_id, self.name = hf, eos_token, eos_id, name
        # Ids can be sparse, so the embedding needs max id + 1 rows, not the count of tokens.
        self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


def _configured_eos(tokenizer_json: str) -> str | None:
    """The eos_token of a tokenizer_config.json beside the tokenizer.json, if there is one."""
    path = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


def _find_eos(hf: tokenizers.Tokenizer, path: str) -> str:
    for token in (_configured_eos(path), *EOS_CANDIDATES):
        if token is not None and hf.token_to_id(token) is not None:
            return token
    raise DataError(f"tokenizer {path}: no EOS token found (tried {', '.join(EOS_CANDIDATES)}); set eos_token")


def _from_file(path: str, eos_token: str | None) -> Tokenizer:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file does not exist: {path!r}")
    try:
        hf = tokenizers.Tokenizer.from_file(path)
    except Exception as e:
        raise DataError(f"tokenizer {path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    return Tokenizer(hf, eos_token or _find_eos(hf, path), path)


def load_tokenizer(cfg: DataConfig, documents: Documents | None = None) -> Tokenizer:
    """cfg.tokenizer loaded, or (when None) the BPE of cfg.bpe_vocab_size trained on the corpus and cached."""
    if cfg.tokenizer is not None:
        return _from_file(cfg.tokenizer, cfg.eos_token)
    cfg.validate()
    documents = documents if documents is not None else open_documents(cfg)
    hf, path = cached_bpe(documents, cfg.bpe_vocab_size, cfg.bpe_train_chars, cfg.cache_dir)
    return Tokenizer(hf, cfg.eos_token or EOS_TOKEN, path)
