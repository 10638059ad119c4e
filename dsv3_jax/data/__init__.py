"""Pre-training data for DeepSeek-V3: read documents, tokenize, pack into seq_len rows, shuffle, batch (grain).
The grain pipeline (make_batch_iterator) is imported on first use, so code that only needs DataConfig (benchmarks,
the GPU image, which has no grain) imports this package without grain.
"""

from dsv3_jax.data._config import DataConfig, DataError
from dsv3_jax.data._documents import Documents, open_documents
from dsv3_jax.data._tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataConfig", "DataError", "Documents", "open_documents", "BatchIterator", "make_batch_iterator",
    "Tokenizer", "load_tokenizer",
]


def __getattr__(name: str):
    if name in ("BatchIterator", "make_batch_iterator"):
        from dsv3_jax.data import _pipeline
        return getattr(_pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
