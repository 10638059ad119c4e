"""Multi-host sharding: processes read disjoint document sets that together are the data set."""

import numpy as np
from data_testing import document_order, encoded, rows_of, stream_tokens

from dsv3_jax.data import DataConfig, make_batch_iterator


def test_two_processes_split_the_documents_between_them(corpus_dir, tokenizer, texts):
    cfg = DataConfig(path=corpus_dir, seq_len=32, batch_size=4, num_epochs=1, shuffle_window_rows=1)
    seen = []
    for process_index in range(2):
        batches = list(make_batch_iterator(cfg, tokenizer, process_index=process_index, process_count=2))
        assert all(b["tokens"].shape == (2, 32) for b in batches)
        seen.append(set(document_order(stream_tokens(rows_of(batches)), encoded(tokenizer, texts))))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(texts)))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_processes_draw_different_rows(corpus_dir, tokenizer):
    cfg = DataConfig(path=corpus_dir, seq_len=32, batch_size=4)
    a = next(make_batch_iterator(cfg, tokenizer, process_index=0, process_count=2))
    b = next(make_batch_iterator(cfg, tokenizer, process_index=1, process_count=2))
    assert not np.array_equal(a["tokens"], b["tokens"])
