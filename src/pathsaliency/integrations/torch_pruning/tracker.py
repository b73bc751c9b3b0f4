"""``ChannelTracker``: which original channels of every layer survive torch-pruning's pruning."""
from __future__ import annotations

import torch
import torch.nn as nn

from pathsaliency.structured import channel_dims, embed_pruned, zero_pruned

from ._compat import graph_of, module_names
from .groups import LAYERS

__all__ = ["ChannelTracker"]


def _widths(m):
    """``(output channels, input channels or None)`` of a conv / linear / batch-norm."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features, None
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    return m.out_channels, m.in_channels


class ChannelTracker:
    """For every conv / linear / batch-norm of the model, the original indices of the output (``out``) and
    input (``inp``) channels still there, updated from each pruning group before it is applied::

        tracker = ChannelTracker(model)
        for group in pruner.step(interactive=True):
            tracker.record(group)
            group.prune()

    ``tracker.kept`` is the map that :func:`pathsaliency.structured.embed_pruned` takes.
    """

    def __init__(self, model: nn.Module):
        self.out, self.inp = {}, {}
        for name, m in model.named_modules():
            if not isinstance(m, LAYERS):
                continue
            channel_dims(m)  # refuses grouped convolutions
            o, i = _widths(m)
            self.out[name] = torch.arange(o)
            if i is not None:
                self.inp[name] = torch.arange(i)

    def record(self, group, names: dict = None):
        """Apply ``group`` (about to be pruned: indices relative to the current shapes) to the record."""
        DG = graph_of(group)
        if names is None:
            names = module_names(DG)
        for dep, idxs in group:
            m = dep.target.module
            if not isinstance(m, LAYERS) or len(idxs) == 0:
                continue
            name = names[m]
            out = isinstance(m, nn.modules.batchnorm._BatchNorm) or DG.is_out_channel_pruning_fn(dep.handler)
            table = self.out if out else self.inp
            keep = torch.ones(len(table[name]), dtype=torch.bool)
            keep[torch.tensor([int(i) for i in idxs], dtype=torch.long)] = False
            table[name] = table[name][keep]

    @property
    def kept(self) -> dict:
        """``{layer name: (kept output channels, kept input channels or None)}`` in original indices."""
        return {name: (out, self.inp.get(name)) for name, out in self.out.items()}

    def check(self, pruned: nn.Module):
        """The pruned model's layer widths are the recorded ones (else the record missed a group)."""
        for name, m in pruned.named_modules():
            if name not in self.out:
                continue
            want = (len(self.out[name]), len(self.inp[name]) if name in self.inp else None)
            if _widths(m) != want:
                raise RuntimeError(f"{name}: pruned widths {_widths(m)} do not match the recorded channels {want}")

    def zeroed(self, original: nn.Module) -> nn.Module:
        """``original`` with every pruned channel zeroed (:func:`pathsaliency.structured.zero_pruned`)."""
        return zero_pruned(original, self.kept)

    def embedded(self, original: nn.Module, pruned: nn.Module) -> nn.Module:
        """``pruned`` in ``original``'s architecture (:func:`pathsaliency.structured.embed_pruned`)."""
        return embed_pruned(original, pruned, self.kept)
