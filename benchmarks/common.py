"""Timing helpers shared by the benchmarks: medians of repeated runs, in the same process (on a GPU each
timed call ends with ``torch.cuda.synchronize``, so queued kernels are counted)."""
from __future__ import annotations

import statistics
import time

import torch


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, repeat=7, warmup=1, setup=None):
    """Median wall time of ``fn()`` in seconds; ``setup()`` runs untimed before each call and its
    result is passed to ``fn``."""
    for _ in range(warmup):
        fn(setup() if setup else None)
    times = []
    for _ in range(repeat):
        arg = setup() if setup else None
        _sync()
        t = time.perf_counter()
        fn(arg)
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_time(model, shape, repeat=7):
    """Median time of one float32 forward pass of ``model`` on a batch of one ``shape`` input (on the
    model's device)."""
    device = next(model.parameters()).device
    x = torch.randn((1,) + tuple(shape), device=device)
    with torch.no_grad():
        return median_time(lambda _: model(x), repeat=repeat, warmup=2)


def timed(fn):
    """``(seconds, result)`` of one call of ``fn()``."""
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
