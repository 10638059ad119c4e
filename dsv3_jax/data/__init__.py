"""Pre-training data for DeepSeek-V3: read documents, tokenize, pack into seq_len rows, shuffle, batch (grain).

    tokenizer = load_tokenizer(cfg)
    it = make_batch_iterator(cfg, tokenizer, process_index, process_count)
    batch = next(it)  # {"tokens", "segment_ids", "positions"}: int32[batch_size // process_count, seq_len]
"""

from dsv3_jax.data._config import DataConfig, DataError
from dsv3_jax.data._documents import Documents, open_documents
from dsv3_jax.data._pipeline import BatchIterator, make_batch_iterator
from dsv3_jax.data._tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataConfig", "DataError", "Documents", "open_documents", "BatchIterator", "make_batch_iterator",
    "Tokenizer", "load_tokenizer",
]
