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


def interleaved(fns: dict, forward, repeat=7, warmup=1):
    """Ratios of each ``fns[name] = (fn, setup)`` to ``forward()``, measured in turns: every round runs
    ``forward`` and then each function (``setup()`` untimed before each call, its result passed to
    ``fn``), each first once untimed and then once timed, so that a load that changes during the run
    weighs on both sides of every ratio alike while every timed call finds the caches its own previous
    call left (as a forward pass in a loop does), not those of the row before. Returns
    ``{name: {"ms", "x_forward", "cpu_ms", "x_forward_cpu"}}`` with medians over the rounds (wall time, and
    this process's CPU time: with one thread the CPU ratio barely moves when other jobs share the cores)
    and ``{"forward": {"ms", "cpu_ms"}}``."""
    wall, cpu = {k: [] for k in ["forward", *fns]}, {k: [] for k in ["forward", *fns]}
    calls = {"forward": (lambda _: forward(), None), **fns}
    for r in range(warmup + repeat):
        for name, (fn, setup) in calls.items():
            fn(setup() if setup else None)  # untimed: the caches as the timed call's own predecessor leaves them
            arg = setup() if setup else None
            _sync()
            t, c = time.perf_counter(), time.process_time()
            fn(arg)
            _sync()
            if r >= warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in calls}
    fw, fc = med["forward"]
    out = {"forward": {"ms": fw * 1e3, "cpu_ms": fc * 1e3}}
    for k in fns:
        w, c = med[k]
        out[k] = {"ms": w * 1e3, "x_forward": w / fw, "cpu_ms": c * 1e3, "x_forward_cpu": c / fc}
    return out


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
