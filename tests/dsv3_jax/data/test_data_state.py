"""Determinism under a seed, and get_state/set_state resuming exactly (through JSON, across epochs)."""

import json

import numpy as np
import pytest
from data_testing import take

from dsv3_jax.data import DataConfig, DataError, make_batch_iterator


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def config(corpus_dir, **overrides):
    # The corpus is ~3.5k tokens: an epoch is ~14 batches of 4 x 64, so 30 batches cross two epoch boundaries.
    return DataConfig(path=corpus_dir, seq_len=64, batch_size=4, shuffle_window_rows=8, **overrides)


def test_same_seed_same_batches_other_seed_other_order(corpus_dir, tokenizer):
    first = take(make_batch_iterator(config(corpus_dir), tokenizer), 12)
    assert_same_batches(first, take(make_batch_iterator(config(corpus_dir), tokenizer), 12))
    other = take(make_batch_iterator(config(corpus_dir, seed=1), tokenizer), 12)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


@pytest.mark.parametrize("k", [0, 1, 5, 13, 14, 15, 27, 28, 40])
def test_restored_iterator_continues_the_same_stream(corpus_dir, tokenizer, k):
    running = make_batch_iterator(config(corpus_dir), tokenizer)
    take(running, k)
    state = json.loads(json.dumps(running.get_state()))  # as it comes back from a checkpoint
    restored = make_batch_iterator(config(corpus_dir), tokenizer)
    restored.set_state(state)
    assert_same_batches(take(running, 8), take(restored, 8))


def test_whole_stream_is_unchanged_by_a_restore_every_batch(corpus_dir, tokenizer):
    expected = take(make_batch_iterator(config(corpus_dir), tokenizer), 30)
    got, state = [], None
    for _ in range(30):
        it = make_batch_iterator(config(corpus_dir), tokenizer)
        if state is not None:
            it.set_state(state)
        got.append(next(it))
        state = json.loads(json.dumps(it.get_state()))
    assert_same_batches(expected, got)


def test_state_is_small_json(corpus_dir, tokenizer):
    it = make_batch_iterator(config(corpus_dir), tokenizer)
    take(it, 3)
    assert len(json.dumps(it.get_state())) < 2000


def test_state_from_other_settings_is_refused(corpus_dir, tokenizer):
    it = make_batch_iterator(config(corpus_dir), tokenizer)
    take(it, 2)
    other = make_batch_iterator(config(corpus_dir, seed=3), tokenizer)
    with pytest.raises(DataError, match="seed"):
        other.set_state(it.get_state())
