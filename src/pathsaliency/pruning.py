"""``prune_unstructured``: one-shot unstructured pruning by a score per weight, lowest first.

Criteria (:data:`CRITERIA`): the paper's ``path-magnitude`` (the path-metric lost by removing a weight
alone), plain ``magnitude`` ``|w|`` (not rescaling-invariant), and the rescaling-invariant criteria of
:mod:`pathsaliency.criteria`. The default ``"auto"`` is the invariant criterion that keeps the most
accuracy on the committed CIFAR-10 results (README), :func:`resolve_criterion`: ``norm-matched`` on
batch-norm networks with a residual stream (global ranking of magnitudes on the representative of the
rescaling orbit whose hidden channels have the trained out/in norm ratio of the stream; within 1 point of
plain magnitude at 40-80 % sparsity on CIFAR ResNet-20 and ResNet-32), else ``norm-balanced-lamp``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from . import params, steps
from .criteria import (DATA_CRITERIA, INVARIANT_CRITERIA, invariant_scores, norm_balanced_defined, norm_matched_defined,
                       restrict)
from .saliency import path_magnitude

CRITERIA = ("path-magnitude", "magnitude") + INVARIANT_CRITERIA


def resolve_criterion(criterion: str, model: nn.Module, calibration=None, output=None) -> str:
    """``criterion``, with ``"auto"`` resolved for ``model``: ``norm-matched`` on batch-norm networks with a
    residual stream (every rescalable layer followed by a batch-norm, and non-rescalable batch-norm
    channels to read the ratio from: :func:`pathsaliency.criteria.norm_matched_defined`), else
    ``norm-balanced-lamp`` where that is defined, else ``wanda-lamp`` given ``calibration``, else
    ``balanced-fan``: the invariant criteria in the order of the committed CIFAR-10 results (README;
    ``norm-matched`` is within 1 point of global magnitude at 40-80 % on ResNet-20 and ResNet-32, full test
    set, ``results/unstructured/norm-matched/``)."""
    if criterion != "auto":
        return criterion
    if norm_matched_defined(model, output):
        return "norm-matched"
    if norm_balanced_defined(model, output):
        return "norm-balanced-lamp"
    return "wanda-lamp" if calibration is not None else "balanced-fan"


def prunable_weights(model: nn.Module, exclude: Callable[[str, torch.Tensor], bool] | None = None) -> list:
    """Names of the conv/linear weights that pruning may zero: trainable ones (``requires_grad``), minus
    ``exclude(name, tensor)``. Frozen weights (e.g. a fixed-weight shortcut) are structure, not theta to prune.
    A tensor shared by several modules appears once, under the name ``model.named_parameters()`` gives it."""
    names, seen = [], set()
    for mname, mod in model.named_modules():
        if isinstance(mod, steps.WEIGHT_MODULES):
            name = params.qualified(mname, "weight")
            if id(mod.weight) in seen:
                continue
            seen.add(id(mod.weight))
            if mod.weight.requires_grad and not (exclude and exclude(name, mod.weight)):
                names.append(name)
    return names


def unstructured_scores(model, input_shape=None, criterion="auto", names=None, *, calibration=None, **kw) -> dict:
    """``{weight name: score}`` for ``criterion``: ``|w|`` for magnitude, the relative path-metric lost for
    path-magnitude, or one of :data:`pathsaliency.criteria.INVARIANT_CRITERIA` (those need ``input_shape``;
    the data-aware :data:`pathsaliency.criteria.DATA_CRITERIA` need ``calibration`` inputs instead, which the
    data-free criteria ignore); ``"auto"``: see :func:`resolve_criterion`."""
    criterion = resolve_criterion(criterion, model, calibration, kw.get("output"))
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    names = prunable_weights(model) if names is None else names
    weights = dict(model.named_parameters())
    if criterion == "magnitude":
        return {n: weights[n].detach().abs() for n in names}
    if criterion in DATA_CRITERIA:
        return invariant_scores(model, input_shape, criterion, names, calibration=calibration, **kw)
    if input_shape is None:
        raise ValueError(f"{criterion} needs input_shape, the shape of one input sample, e.g. (3, 224, 224)")
    if criterion in INVARIANT_CRITERIA:
        return invariant_scores(model, input_shape, criterion, names, **kw)
    return restrict(path_magnitude(model, input_shape, **kw), names, criterion)


def masks_from_scores(scores: dict, amount: float, scope: str = "global") -> dict:
    """Boolean keep-masks that remove the ``amount`` fraction of lowest scores (exact count, ties broken
    by position), over all weights together (``scope="global"``) or per weight tensor (``"local"``)."""
    if not 0 <= amount <= 1:
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    if scope == "local":
        return {n: masks_from_scores({n: s}, amount, "global")[n] for n, s in scores.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64).cpu() for s in scores.values()])
    k = int(round(amount * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:  # the k lowest, ties taken by position: a threshold, then the first tied entries (linear time)
        t = flat.kthvalue(k).values
        keep &= ~(flat < t)
        ties = (flat == t).nonzero().flatten()
        keep[ties[: k - int((~keep).sum())]] = False
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start:start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


def apply_masks(model: nn.Module, masks: dict, use_torch_prune: bool = False) -> nn.Module:
    """A pruned deep copy: weights zeroed where the mask is False, or, with ``use_torch_prune``, masks
    attached through ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` + ``weight_mask``)."""
    from torch.nn.utils import prune as torch_prune

    pruned = copy.deepcopy(model)
    for name, mask in masks.items():
        mname, _, pname = name.rpartition(".")
        mod = pruned.get_submodule(mname)
        if use_torch_prune:
            torch_prune.custom_from_mask(mod, pname, mask.to(getattr(mod, pname).device))
        else:
            with torch.no_grad():
                getattr(mod, pname).mul_(mask.to(getattr(mod, pname).dtype))
    return pruned


def prune_unstructured(model: nn.Module, amount: float, input_shape=None, *, criterion="auto",
                       scope="global", use_torch_prune=False, exclude=None, calibration=None, **kw):
    """Prune the ``amount`` fraction of conv/linear weights with the lowest ``criterion`` scores.

    Returns ``(pruned_copy, masks)``: the copy has those weights set to zero (or, with
    ``use_torch_prune=True``, carries ``torch.nn.utils.prune`` masks); ``masks`` maps weight names to
    boolean keep-masks. ``model`` is not modified. ``criterion`` is one of :data:`CRITERIA` or ``"auto"``
    (:func:`resolve_criterion`: ``norm-matched`` on batch-norm networks with a residual stream, else
    ``norm-balanced-lamp``; the invariant criteria that keep the most accuracy on the committed results, README). ``calibration`` (inputs: a tensor or an
    iterable of batches) feeds the data-aware criteria (``wanda-lamp``, ``wanda``; :mod:`pathsaliency.criteria`);
    ``**kw`` goes to the path-lifting scores (``output``, ``dtype``).
    """
    names = prunable_weights(model, exclude)
    scores = unstructured_scores(model, input_shape, criterion, names, calibration=calibration, **kw)
    masks = masks_from_scores(scores, amount, scope)
    return apply_masks(model, masks, use_torch_prune), masks
