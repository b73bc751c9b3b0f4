"""``random_rescale``: a function-preserving rescaled copy (the symmetry of MATH.md section 2).

For every hidden channel whose producer is a conv/linear layer (optionally through a frozen batch-norm)
and whose value reaches only conv/linear layers (through ReLU, dropout, max/average pooling, or a flatten
right before a linear layer), the incoming side is multiplied by a random ``lam > 0`` and the outgoing
side divided by it: the batch-norm's ``gamma`` and ``beta`` (or the conv/linear rows and bias) times
``lam``, every consumer's input channel divided by ``lam``. ReLU and pooling commute with a positive
per-channel factor, so the function is unchanged; every path coefficient ``Phi_p`` is unchanged, while
plain weight magnitudes are not. With powers of two (the default factors) the rescaling is exact in
floating point.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import ops
from .lifting import lift
from .params import qualified

_POOLS = ops.AVG_MODULES + ops.ADAPTIVE_AVG_MODULES
_POOL_FUNCTIONS = ops.AVG_FUNCTIONS | ops.ADAPTIVE_AVG_FUNCTIONS


def _passthrough(action) -> str | None:
    """'keep' for an operator that commutes with a positive per-channel factor, 'flatten' for a flatten,
    None otherwise."""
    if isinstance(action, (ops.Identity, ops.WindowSum, ops.AdaptiveWindowSum)):
        return "keep"
    if isinstance(action, ops.Same) and not action.combines:
        fn = action.fn
        if isinstance(fn, _POOLS) or fn in _POOL_FUNCTIONS:
            return "keep"
        if isinstance(fn, nn.Flatten) or fn is torch.flatten:
            return "flatten"
    return None


def rescalable_channels(plan) -> list:
    """``[(producer step, [(consumer step, flattened), ...]), ...]`` for every producer whose hidden
    channels can be rescaled."""
    readers = {}
    for step in plan.steps:
        readers.setdefault(step.input, []).append(step)
    out = []
    for step in plan.steps:
        if step.kind not in ("conv", "linear") or step.module in plan.shared:
            continue
        consumers, frontier, ok = [], [(step.node, False)], True
        while frontier and ok:
            node, flat = frontier.pop()
            if node is plan.output:
                ok = False
                break
            for s in readers.get(node, []):
                if s.kind not in ("conv", "conv_transpose", "linear") or s.module in plan.shared:
                    ok = False
                elif flat and s.kind != "linear":
                    ok = False
                else:
                    consumers.append((s, flat))
            for user in node.users:
                if user in plan.absorbed or user in plan.affine:
                    continue  # a conv/linear reading this node: handled through ``readers``
                kind = _passthrough(plan.actions.get(user))
                if kind is None or (flat and kind != "keep"):
                    ok = False
                    break
                frontier.append((user, flat or kind == "flatten"))
        if ok and consumers:
            out.append((step, consumers))
    return out


def random_rescale(model: nn.Module, factors=(1, 128, 4096), generator: torch.Generator | None = None) -> nn.Module:
    """A deep copy of ``model`` computing the same function, with every rescalable hidden channel
    (see the module docstring) rescaled by a factor drawn uniformly from ``factors``."""
    if any(f <= 0 for f in factors):
        raise ValueError("rescaling factors must be positive")
    copied = copy.deepcopy(model)
    plan = lift(copied).plan
    choices = torch.tensor([float(f) for f in factors], dtype=torch.float64)
    params = dict(copied.named_parameters())
    with torch.no_grad():
        for step, consumers in rescalable_channels(plan):
            if step.bn is not None and qualified(step.bn, "weight") not in params:
                continue  # a batch-norm without affine parameters: nothing exact to scale
            width = params[qualified(step.module, "weight")].shape[0]
            lam = choices[torch.randint(len(choices), (width,), generator=generator)]
            if step.bn is not None:
                _scale_rows(params[qualified(step.bn, "weight")], lam)
                _scale_rows(params[qualified(step.bn, "bias")], lam)
            else:
                _scale_rows(params[qualified(step.module, "weight")], lam)
                if qualified(step.module, "bias") in params:
                    _scale_rows(params[qualified(step.module, "bias")], lam)
            for s, flat in consumers:
                _scale_inputs(s, params[qualified(s.module, "weight")], 1.0 / lam, flat)
    return copied


def _scale_rows(p, lam):
    p.mul_(lam.to(p.dtype).to(p.device).view((-1,) + (1,) * (p.dim() - 1)))


def _scale_inputs(step, w, inv, flat):
    inv = inv.to(w.dtype).to(w.device)
    if step.kind == "linear":
        k = w.shape[1] // len(inv) if flat else 1
        if k * len(inv) != w.shape[1]:
            raise ValueError(f"cannot map {len(inv)} channels onto the {w.shape[1]} inputs of '{step.module}'")
        w.mul_(inv.repeat_interleave(k).view(1, -1))
    elif step.kind == "conv_transpose":  # weight: (in, out / groups, *k)
        w.mul_(inv.view((-1,) + (1,) * (w.dim() - 1)))
    else:  # weight: (out, in / groups, *k); input channel c = group * (in / groups) + local
        g = step.conv.groups
        out, per = w.shape[0], w.shape[1]
        view = w.view(g, out // g, per, *w.shape[2:])
        view.mul_(inv.view(g, 1, per, *([1] * (w.dim() - 2))))
