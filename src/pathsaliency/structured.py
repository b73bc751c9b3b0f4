"""The certificate of a physically pruned model: embed it back into its original architecture.

The path-metric compares two parameter vectors of one architecture, and channel pruning changes the
architecture. For every layer whose channels were removed, ``kept[name] = (out, in)`` lists the original
indices of the output channels and of the input channels that survive (None: all of them). Then
:func:`embed_pruned` writes the pruned model's values into a copy of the original at those channels and
zeros everywhere else (a removed channel's weights, bias and batch-norm affine entries, and every weight
that reads a removed input channel). That copy computes exactly the pruned model's function (a removed
channel is 0 where it is made and is read by zero weights), so::

    D = path_metric(original, embed_pruned(original, pruned, kept), shape)
    ||R_original(x) - R_pruned(x)||_1 <= max(1, ||x||_inf) * D      for every input x

and ``D`` is exact (``D.exact``) when the pruned model was not trained further (the embedding is then
dominated by the original). :func:`zero_pruned` is the original with the removed channels zeroed: the
embedding of the pruned model before any fine-tuning.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .errors import ArchitectureMismatchError, PathSaliencyError
from .steps import step_class

__all__ = ["embed_pruned", "zero_pruned", "channel_dims"]

def channel_dims(module: nn.Module):
    """``(output-channel dim, input-channel dim)`` of ``module.weight`` (None for a batch-norm's input): the
    ``weight_dims`` of the module's affine step (:func:`pathsaliency.steps.step_class`). Grouped
    convolutions are refused: their kept channels cannot be embedded index by index."""
    step = step_class(module)
    if step is None:
        raise PathSaliencyError(f"{type(module).__name__} is not a conv, linear or batch-norm layer: "
                                "no channels to embed")
    if getattr(module, "groups", 1) != 1:
        raise PathSaliencyError(f"grouped convolution ({type(module).__name__}, groups={module.groups}): "
                                "the channels it keeps cannot be embedded index by index; only groups=1")
    return step.weight_dims


def _index(t, dims, kept):
    """The advanced index of ``t`` that selects the kept entries along ``dims`` (full range elsewhere)."""
    idx = [torch.arange(n, device=t.device) for n in t.shape[:max(d for d in dims if d is not None) + 1]]
    for d, k in zip(dims, kept):
        if d is not None and k is not None:
            idx[d] = torch.as_tensor(k, dtype=torch.long, device=t.device)
    view = [1] * len(idx)
    out = []
    for d, i in enumerate(idx):
        v = list(view)
        v[d] = -1
        out.append(i.view(v))
    return tuple(out)


def _embed_module(e, src, name, kept, zero_elsewhere):
    out_dim, in_dim = channel_dims(e)
    out, inp = kept
    for pname, t in list(e.named_parameters(recurse=False)) + list(e.named_buffers(recurse=False)):
        s = getattr(src, pname)
        if t.dim() == 0:
            t.copy_(s)
            continue
        dims = (out_dim, in_dim) if pname == "weight" else (0, None)
        index = _index(t, dims, (out, inp))
        want = tuple(i.numel() if i.dim() else 1 for i in (j.flatten() for j in index))
        if tuple(s.shape[:len(want)]) != want:
            raise ArchitectureMismatchError(f"'{name}.{pname}' of the pruned model has shape {tuple(s.shape)}; "
                                            f"the kept channels give {want}")
        if zero_elsewhere and pname not in ("running_mean", "running_var"):
            t.zero_()  # running statistics of removed channels stay the original's: their affine is 0
        t[index] = s.to(t)


def embed_pruned(original: nn.Module, pruned: nn.Module, kept: dict) -> nn.Module:
    """A copy of ``original`` holding ``pruned``'s parameters and buffers at the kept channels and zeros
    elsewhere: the pruned model's function in the original architecture (see the module docstring).

    ``kept``: ``{layer name: (kept output channels, kept input channels)}`` in original indices (None: all;
    input channels of a linear layer are features). Every other module must have the same shapes in both
    models (its values are the pruned model's). Neither model is modified.
    """
    e = copy.deepcopy(original)
    src = dict(pruned.named_modules())
    with torch.no_grad():
        for name, m in e.named_modules():
            p = src.get(name)
            if p is None:
                raise ArchitectureMismatchError(f"the pruned model has no module '{name}'")
            if name in kept:
                _embed_module(m, p, name, kept[name], zero_elsewhere=True)
                continue
            for pname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                s = getattr(p, pname, None)
                if s is None or s.shape != t.shape:
                    raise ArchitectureMismatchError(
                        f"'{name}.{pname}' changed shape ({tuple(t.shape)} -> "
                        f"{None if s is None else tuple(s.shape)}) but '{name}' has no kept channels")
                t.copy_(s)
    return e


def zero_pruned(original: nn.Module, kept: dict) -> nn.Module:
    """A copy of ``original`` with every channel that ``kept`` does not list zeroed (output channels:
    weights, bias and batch-norm affine entries; input channels: the weights that read them)."""
    z = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in z.named_modules():
            if name not in kept:
                continue
            out_dim, in_dim = channel_dims(m)
            for pname, t in m.named_parameters(recurse=False):
                dims = (out_dim, in_dim) if pname == "weight" else (0, None)
                keep = torch.zeros_like(t, dtype=torch.bool)
                keep[_index(t, dims, kept[name])] = True
                t[~keep] = 0
    return z
