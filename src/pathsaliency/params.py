"""The parameter vector theta of MATH.md section 1: every edge weight and bias after folding frozen
batch-norm, one ``(W, b)`` pair per affine step of the graph.

A batch-norm with scale ``s = gamma / sqrt(var + eps)`` and shift ``t = beta - mean * s`` folds into the
conv/linear ``(W, b)`` before it as ``(s * W, s * b + t)`` (``s`` multiplies the output channel); a
standalone batch-norm is the diagonal step ``(s, t)``.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from . import compressed
from .errors import ArchitectureMismatchError, PathSaliencyError
from .steps import BatchNormStep


def qualified(module: str, name: str) -> str:
    """The name of tensor ``name`` of the module named ``module`` ('' for the root: a bare nn.Linear)."""
    return f"{module}.{name}" if module else name


def named_tensors(source) -> Mapping[str, torch.Tensor]:
    """The tensors a module computes with by qualified name (:func:`compressed.module_tensors`: refuses a
    compressed model it cannot read), or a state dict as given (refused if it holds integer weights)."""
    if isinstance(source, nn.Module):
        return compressed.module_tensors(source)
    if isinstance(source, Mapping):
        compressed.check_storage(source, "state dict")
        return source
    raise TypeError(f"expected an nn.Module or a mapping of parameter names to tensors, got {type(source).__name__}")


def effective(step, tensors: Mapping[str, torch.Tensor], dtype, device, absolute=False):
    """The signed ``(W, b)`` of one affine step (``b`` may be None) in ``dtype`` on ``device``; with
    ``absolute``, ``(|W|, |b|)`` (``|s * W| = |s| * |W|`` exactly: the folded product is made
    non-negative in place, with no second weight-sized tensor)."""
    def get(name, required=True):
        t = tensors.get(name)
        if t is None:
            if required:
                raise ArchitectureMismatchError(f"no tensor named '{name}' (needed by step '{step.name}')")
            return None
        return t.detach().to(device=device, dtype=dtype)

    if isinstance(step, BatchNormStep):
        s, t = _bn_affine(step, get)
        return (s.abs(), t.abs()) if absolute else (s, t)
    w = get(qualified(step.module, "weight"))
    b = get(qualified(step.module, "bias"), required=False)
    if step.bn is None:
        return (w.abs(), None if b is None else b.abs()) if absolute else (w, b)
    s, t = _bn_affine(step, get)
    w = step.scale_outputs(w, s)  # a new tensor
    b = t if b is None else s * b + t
    return (w.abs_(), b.abs()) if absolute else (w, b)


def _bn_affine(step, get):
    mean, var = get(qualified(step.bn, "running_mean")), get(qualified(step.bn, "running_var"))
    gamma, beta = get(qualified(step.bn, "weight"), False), get(qualified(step.bn, "bias"), False)
    s = torch.rsqrt(var + step.eps)
    if gamma is not None:
        s = gamma * s
    t = -mean * s
    if beta is not None:
        t = t + beta
    return s, t


def check_finite(tensors: Mapping[str, torch.Tensor], names, what="model"):
    """Refuse NaN or infinite parameters, naming them and the model (``what``) they belong to. One read
    per tensor (``aminmax`` propagates NaN and shows an infinity), one read-back for all of them."""
    checked = [n for n in names if n in tensors and tensors[n].is_floating_point() and tensors[n].numel()]
    if not checked:
        return
    device = tensors[checked[0]].device
    bounds = torch.stack([torch.stack(torch.aminmax(tensors[n].detach())).to(device, torch.float64) for n in checked])
    finite = torch.isfinite(bounds).all(1).tolist()
    bad = [n for n, ok in zip(checked, finite) if not ok]
    if bad:
        raise PathSaliencyError(f"the {what} has NaN or infinite values in: {', '.join(bad)}")


def check_batchnorms(tensors: Mapping[str, torch.Tensor], steps, what="model"):
    """Refuse a batch-norm whose ``running_var + eps`` is not positive: its scale ``1/sqrt(var + eps)``
    is not a finite number."""
    for step in steps:
        var = tensors.get(qualified(step.bn, "running_var")) if step.bn is not None else None
        if var is None:
            continue
        bad = (var.detach() + step.eps <= 0).nonzero().flatten()
        if len(bad):
            raise PathSaliencyError(
                f"batch-norm '{step.bn}' of the {what} has running_var + eps <= 0 in channel(s) {bad[:8].tolist()} "
                f"(running_var {var.detach()[bad[0]].item():.3g}, eps {step.eps:.3g}): its scale 1/sqrt(var + eps) is "
                "not finite; recalibrate its running statistics or give it eps > 0")


def step_tensor_names(step):
    names = []
    if step.module is not None:
        names += [qualified(step.module, k) for k in ("weight", "bias")]
    if step.bn is not None:
        names += [qualified(step.bn, k) for k in ("weight", "bias", "running_mean", "running_var")]
    return names
