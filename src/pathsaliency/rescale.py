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

from .lifting import lift
from .ops import ChannelMap
from .steps import ConvStep, ConvTransposeStep, LinearStep
from .params import qualified


def rescalable_channels(plan) -> list:
    """``[(producer step, [(consumer step, flattened), ...]), ...]`` for every producer whose hidden
    channels can be rescaled."""
    readers = {}
    for step in plan.steps:
        readers.setdefault(step.input, []).append(step)
    out = []
    for step in plan.steps:
        if not isinstance(step, (ConvStep, LinearStep)) or step.module in plan.shared:
            continue
        consumers, frontier, ok = [], [(step.node, False)], True
        while frontier and ok:
            node, flat = frontier.pop()
            if node is plan.output:
                ok = False
                break
            for s in readers.get(node, []):
                if not isinstance(s, (ConvStep, ConvTransposeStep, LinearStep)) or s.module in plan.shared:
                    ok = False
                elif flat and not isinstance(s, LinearStep):
                    ok = False
                else:
                    consumers.append((s, flat))
            for user in node.users:
                if user in plan.absorbed or user in plan.affine:
                    continue  # a conv/linear reading this node: handled through ``readers``
                action = plan.actions.get(user)
                channels = action.channels if action is not None else None
                if channels not in (ChannelMap.KEEP, ChannelMap.FLATTEN) or (flat and channels is not ChannelMap.KEEP):
                    ok = False
                    break
                frontier.append((user, flat or channels is ChannelMap.FLATTEN))
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
                w = params[qualified(s.module, "weight")]
                s.scale_inputs(w, (1.0 / lam).to(w.dtype).to(w.device), flat)
    return copied


def _scale_rows(p, lam):
    p.mul_(lam.to(p.dtype).to(p.device).view((-1,) + (1,) * (p.dim() - 1)))
