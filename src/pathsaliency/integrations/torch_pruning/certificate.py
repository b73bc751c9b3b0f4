"""The certified distance between a model and its copy physically pruned by torch-pruning."""
from __future__ import annotations

import torch

from pathsaliency import path_metric

__all__ = ["certify_pruned"]


def certify_pruned(original, pruned, tracker, input_shape, *, output=None, dtype=torch.float64):
    """``path_metric(original, tracker.embedded(original, pruned), input_shape)``: ``D`` with
    ``||R_original(x) - R_pruned(x)||_1 <= max(1, ||x||_inf) * D`` on every input, exact (``D.exact``)
    when ``pruned`` was only pruned (not trained further). ``tracker``: the :class:`ChannelTracker` that
    recorded every group applied to ``pruned``. Neither model is modified."""
    tracker.check(pruned)
    return path_metric(original, tracker.embedded(original, pruned), input_shape, output=output, dtype=dtype)
