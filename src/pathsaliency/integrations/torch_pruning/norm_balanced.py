"""``NormBalancedImportance``: torch-pruning's own group magnitude importance, read on the norm-balanced
representative of the rescaling orbit (:func:`pathsaliency.criteria.norm_balanced_parameters`).

Plain magnitude ranks channels well on a trained network because weight decay leaves it near the point of
its rescaling orbit where every hidden channel has as much weight going in as going out; after a
function-preserving rescaling it ranks them arbitrarily. Evaluating the same formula on that balanced
point instead of on the weights as they happen to be makes it invariant by construction: rescaled
copies of one network (powers of two) give bit-identical scores, hence identical pruning.
"""
from __future__ import annotations

import copy

import torch
import torch_pruning as tp

from pathsaliency.criteria import norm_balanced_parameters

from ._compat import graph_of, group_on_modules
from .model_state import ModelState

__all__ = ["NormBalancedImportance"]


class NormBalancedImportance(tp.importance.GroupMagnitudeImportance):
    """``tp.importance.GroupMagnitudeImportance`` (same ``p``, ``group_reduction``, ``normalizer``,
    ``bias`` and ``target_types``, and the same defaults: ``p=2`` is the recipe's ``l2`` row, ``p=1`` its
    ``l1``) computed on the norm-balanced representative of the group's model: each consumer column of a
    rescalable channel ``j`` divided by ``lam_j = sqrt(||W_:j||_2 / |gamma_j|)``, its batch-norm's
    ``gamma_j``, ``beta_j`` multiplied by it, every other weight as trained.

    torch-pruning's own ``__call__`` does the scoring, on a copy of the group whose items point at the
    modules of a private copy of the model holding the representative: the user's model is never
    written. That copy is rebuilt whenever the model's parameters differ (in value or shape) from those
    it was built from (between ``MetaPruner`` steps, after training), else reused.

    Args:
        output: which output of a model returning a tuple/dict (an index, a key or a callable), for the
            graph of the rescalable channels.
        Others: as ``tp.importance.GroupMagnitudeImportance``.

    A model in which a rescalable layer has no affine batch-norm is refused (``ValueError``) on the first
    group: the representative is not defined there.
    """

    def __init__(self, p=2, group_reduction="mean", normalizer="mean", bias=False, output=None, **kw):
        super().__init__(p=p, group_reduction=group_reduction, normalizer=normalizer, bias=bias, **kw)
        self.output = output
        self._state, self._modules = ModelState(), None

    def representative_modules(self, model) -> dict:
        """``{module of model: the same module of the representative copy}`` (cached per parameter state)."""
        if not self._state.same(model):
            rep = copy.deepcopy(model)
            balanced = norm_balanced_parameters(model, self.output)
            with torch.no_grad():
                for name, p in rep.named_parameters():
                    p.copy_(balanced[name])
            reps = dict(rep.named_modules())
            self._modules = {m: reps[n] for n, m in model.named_modules()}
            self._state.remember(model)
        return self._modules

    @torch.no_grad()
    def __call__(self, group):
        DG = graph_of(group)
        modules = self.representative_modules(DG.model)
        return super().__call__(group_on_modules(group, lambda m: modules.get(m, m)))

