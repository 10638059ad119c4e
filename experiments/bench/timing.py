"""Timing for device benchmarks: warm up, then the median of synchronised calls (host clock after
`block_until_ready`, which is exact for calls far longer than a launch), plus the spread so noise is visible."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable, *args, warmup: int = 3, iters: int = 20) -> dict:
    """{"median": s, "min": s, "max": s} over `iters` calls of fn(*args) after `warmup` calls (compile included)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def torch_median_seconds(fn: Callable, *, warmup: int = 3, iters: int = 20) -> dict:
    """The same for a PyTorch CUDA callable, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}
