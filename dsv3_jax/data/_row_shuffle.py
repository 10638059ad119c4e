"""RowShuffleIterDataset: shuffles a grain stream within consecutive windows, with exact resume."""

from __future__ import annotations

import itertools
from typing import Any

import grain
import numpy as np


class RowShuffleIterDataset(grain.IterDataset):
    """Like grain's WindowShuffleIterDataset, but each window is permuted by numpy in one call (grain's per-index
    shuffle costs milliseconds an element for small windows). The state is the parent's state at the window's
    start, the window's number and how many of its elements were emitted; restoring re-reads that window."""

    def __init__(self, parent: grain.IterDataset, *, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = window_size, seed

    def __iter__(self) -> grain.DatasetIterator:
        return _RowShuffleIterator(self._parent.__iter__(), self._window_size, self._seed)


class _RowShuffleIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = window_size, seed
        self._window: list | None = None  # None until the first window is read
        self._window_index, self._emitted = 0, 0
        self._window_start = parent.get_state()

    def _read_window(self) -> None:
        self._window_start = self._parent.get_state()
        window = list(itertools.islice(self._parent, self._window_size))
        order = np.random.default_rng([self._seed, self._window_index]).permutation(len(window))
        self._window, self._emitted = [window[i] for i in order], 0

    def __next__(self):
        if self._window is None or self._emitted == len(self._window):
            if self._window is not None:
                self._window_index += 1
            self._read_window()
            if not self._window:
                raise StopIteration
        element = self._window[self._emitted]
        self._window[self._emitted] = None  # emitted rows need not stay alive
        self._emitted += 1
        return element

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self._window_start, "window_index": self._window_index, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._window_index = state["window_index"]
        self._read_window()
        self._emitted = state["emitted"]
