"""Packing: row layout invariants, and every document's tokens + EOS exactly once per epoch, in order."""

from collections import Counter

import numpy as np
import pytest
from data_testing import check_row_invariants, document_order, encoded, rows_of, stream_tokens

from dsv3_jax.data import DataConfig, make_batch_iterator


@pytest.mark.parametrize("seq_len", [2, 16, 64])
def test_rows_keep_the_layout_the_model_masks_by(corpus_dir, tokenizer, seq_len):
    cfg = DataConfig(path=corpus_dir, seq_len=seq_len, batch_size=4, num_epochs=2, shuffle_window_rows=8)
    batches = list(make_batch_iterator(cfg, tokenizer))
    assert batches
    for batch in batches:
        check_row_invariants(batch, rows=4, seq_len=seq_len, eos_id=tokenizer.eos_id)


def test_unshuffled_epoch_is_the_documents_in_order(corpus_dir, tokenizer, texts):
    cfg = DataConfig(path=corpus_dir, seq_len=32, batch_size=3, num_epochs=1, shuffle=False)
    rows = rows_of(list(make_batch_iterator(cfg, tokenizer)))
    np.testing.assert_array_equal(stream_tokens(rows), np.concatenate(encoded(tokenizer, texts)))
    # Only the very last row may be partly padding, and only padding rows may follow it.
    used = (rows["segment_ids"] > 0).sum(1)
    assert np.all(used[:-3] == 32)


def test_shuffled_epochs_hold_each_document_once_in_a_new_order(corpus_dir, tokenizer, texts):
    cfg = DataConfig(path=corpus_dir, seq_len=32, batch_size=2, num_epochs=2, shuffle_window_rows=1)
    order = document_order(stream_tokens(rows_of(list(make_batch_iterator(cfg, tokenizer)))), encoded(tokenizer, texts))
    first, second = order[:len(texts)], order[len(texts):]
    assert sorted(first) == sorted(second) == list(range(len(texts)))
    assert first != second != list(range(len(texts)))


def test_row_shuffle_loses_and_duplicates_nothing(corpus_dir, tokenizer, texts):
    cfg = DataConfig(path=corpus_dir, seq_len=16, batch_size=2, num_epochs=1, shuffle_window_rows=64)
    rows = rows_of(list(make_batch_iterator(cfg, tokenizer)))
    expected = np.concatenate(encoded(tokenizer, texts))
    got = stream_tokens(rows)
    assert Counter(got.tolist()) == Counter(expected.tolist())
    assert not np.array_equal(got, expected), "rows were not shuffled"
