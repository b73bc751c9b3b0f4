"""``GroupFisherImportance``: a data-aware, rescaling-invariant group score, the squared first-order change
of the loss when a whole channel is removed, averaged over samples (the group Fisher information of a
channel gate, Liu et al. 2021 "Group Fisher Pruning").

For each channel ``c`` of a group and each calibration sample ``n``, ``z_n(c) = sum over the group's
producers p of sum over positions of a_p(c) * dL_n / da_p(c)``, where ``a_p`` is the output of producer
``p`` (a conv/linear that loses output channels, read *after* the batch-norm it feeds, if any; the
producers of a residual stream are all the layers that add into it): ``z_n(c)`` is the derivative of the
sample's loss with respect to a gate multiplying channel ``c`` wherever it is produced, i.e. minus the
first-order change of that loss when the channel is removed. The score is ``mean over n of z_n(c)^2``.

Rescaling-invariant: a hidden channel rescaled by ``mu`` (its batch-norm's ``gamma`` and ``beta``, or its
producer's row and bias, times ``mu``, its consumers' columns divided by it) has ``a`` times ``mu`` and
``dL/da`` divided by ``mu``; with powers of two every product is exact, so the scores and ``MetaPruner``'s
picks are bit-identical after ``pathsaliency.random_rescale``. The same holds for torch-pruning's own
``TaylorImportance`` (``|theta * dL/dtheta|`` term by term); this score differs from it in summing the
group's terms *before* taking the square (the loss change of removing the channel, not of each weight
alone) and in averaging squares over samples (no cancellation between samples).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch_pruning as tp

from ._compat import graph_of
from .model_state import ModelState

__all__ = ["GroupFisherImportance"]

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


def _summed_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="sum")


class GroupFisherImportance(tp.importance.GroupMagnitudeImportance):
    """``mean over calibration samples of (d loss / d gate of the channel)^2`` for each channel of a group
    (see the module docstring), normalised within the group by torch-pruning's ``normalizer`` (same
    options and default as its magnitude importances).

    Args:
        calibration: an iterable of ``(inputs, targets)`` batches (re-iterated whenever the model's
            parameters change: a list, or a re-iterable loader).
        loss: ``loss(outputs, targets)`` summed (not averaged) over the batch, so that each sample's
            gradient is its own loss's (the model runs in eval mode: samples do not interact). Default:
            cross-entropy with ``reduction="sum"``.
        normalizer: as ``tp.importance.GroupMagnitudeImportance`` (``"mean"``; a group whose scores are
            all zero is returned unnormalised, never NaN).

    The gradients are taken on a private eval-mode copy of the model: the user's model (its ``.grad``,
    ``training`` flag and hooks included) is never written. That copy and its gate derivatives are
    recomputed whenever the model's parameters differ (value or shape) from those they were computed
    from (between ``MetaPruner`` steps), else reused. Data-aware: the rows it gives depend on the
    calibration data.
    """

    def __init__(self, calibration, loss=None, normalizer="mean", device=None):
        super().__init__(p=2, group_reduction="sum", normalizer=normalizer)
        self.calibration = calibration
        self.loss = loss or _summed_loss
        self.device = device
        self._state, self._z, self._after = ModelState(), None, None

    # -- gate derivatives --------------------------------------------------------------------------------

    def gate_derivatives(self, model):
        """``({module of model: (samples, channels) float64 z}, {conv/linear: the batch-norm it feeds})``."""
        if self._state.same(model):
            return self._z, self._after
        probe = copy.deepcopy(model).eval()
        for p in probe.parameters():
            p.requires_grad_(False)
        names = {m: n for n, m in probe.named_modules()}
        watched = [m for m in probe.modules() if isinstance(m, _PRODUCERS + _NORMS)]
        outs, inputs, hooks = {}, {}, []

        def hook(module, args, output):
            if not output.requires_grad:  # the first layer on a plain input: gate derivatives need a graph
                return
            output.retain_grad()
            outs.setdefault(module, []).append(output)
            if isinstance(module, _NORMS):
                inputs.setdefault(module, []).append(args[0])

        for m in watched:
            hooks.append(m.register_forward_hook(hook))
        z, after = {}, {}
        try:
            for x, y in self.calibration:
                outs.clear()
                inputs.clear()
                device = self.device or next(iter(model.parameters())).device
                x = x.to(device).requires_grad_(True)  # every layer's output then carries a graph
                with torch.enable_grad():
                    self.loss(probe(x), y.to(device)).backward()
                produced = {id(t): m for m in outs for t in outs[m] if isinstance(m, _PRODUCERS)}
                for bn, ts in inputs.items():
                    for t in ts:
                        if id(t) in produced:
                            after[names[produced[id(t)]]] = names[bn]
                for m, ts in outs.items():
                    dim = -1 if isinstance(m, nn.Linear) else 1
                    total = 0
                    for t in ts:
                        prod = (t.detach() * t.grad).to(torch.float64).movedim(dim, 1)
                        total = total + prod.reshape(prod.shape[0], prod.shape[1], -1).sum(2)
                    z.setdefault(names[m], []).append(total)
        finally:
            for h in hooks:
                h.remove()
        mods = dict(model.named_modules())
        self._z = {mods[n]: torch.cat(v) for n, v in z.items()}
        self._after = {mods[c]: mods[b] for c, b in after.items()}
        self._state.remember(model)
        return self._z, self._after

    # -- the group score ---------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, group):
        DG = graph_of(group)
        z, after = self.gate_derivatives(DG.model)
        followed = set(after.values())
        n = len(group[0].idxs)
        total, seen = None, set()
        for item in group:
            dep, idxs = item.dep, item.idxs
            m, fn = dep.target.module, dep.handler
            if isinstance(m, _PRODUCERS) and DG.is_out_channel_pruning_fn(fn):
                gate = after.get(m, m)
            elif isinstance(m, _NORMS) and m not in followed:
                gate = m  # a batch-norm that no conv/linear of the model feeds directly
            else:
                continue
            if gate in seen or gate not in z or any(r is None for r in item.root_idxs):
                continue
            seen.add(gate)
            t = z[gate][:, list(idxs)]
            if total is None:
                total = torch.zeros(t.shape[0], n, dtype=torch.float64)
            total[:, list(item.root_idxs)] += t
        if total is None:
            return None
        scores = total.pow(2).mean(0).to(torch.float32)
        if self.normalizer is not None and not bool(scores.any()):
            return scores
        return self._normalize(scores, self.normalizer)

