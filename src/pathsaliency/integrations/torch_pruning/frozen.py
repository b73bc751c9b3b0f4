"""``FrozenFollowingPruner``: a ``MetaPruner`` whose frozen layers are never pruned as layers of their own
but whose channels follow the groups they belong to."""
from __future__ import annotations

import torch_pruning as tp

from ._compat import group_with_items, module_names

__all__ = ["FrozenFollowingPruner"]


def _members(group):
    """What a group cuts: (layer, handler, number of indices) of each item."""
    return sorted((id(d.target.module), getattr(d.handler, "__name__", str(d.handler)), len(i)) for d, i in group)


class FrozenFollowingPruner(tp.pruner.MetaPruner):
    """``MetaPruner`` with ``frozen_layers``: layers that are ignored (never a group's root, never scored
    by the importance, weights not trainable) whose channels nevertheless follow the groups they belong to.

    ``MetaPruner`` drops every group in which an ignored layer loses output channels; for the frozen 0/1
    shortcut convolution of a CIFAR ResNet that is the whole residual stream after it. Here the groups
    are built with the frozen layers counted as ordinary members, a group that a frozen layer would root
    is re-rooted at another of its layers (same channels, same items), the frozen layers are in
    ``ignored_layers`` and the importance (``scoring_frozen=False``) sees the group without them.
    ``scoring_frozen=True`` passes the whole group (the path-metric: the frozen weights are part of the
    function, and of what removing a channel costs).
    """

    def __init__(self, model, example_inputs, importance, *, frozen_layers=(), ignored_layers=None,
                 scoring_frozen=False, **kw):
        self._frozen = list(frozen_layers)
        self._frozen_set = set(self._frozen)
        self._scoring_frozen = scoring_frozen
        super().__init__(model, example_inputs, importance, ignored_layers=list(ignored_layers or []) + self._frozen,
                         **kw)
        self.freeze()

    # MetaPruner builds self.DG in __init__ and asks it for groups at once: wrap it as it is set.
    @property
    def DG(self):
        return self._dg

    @DG.setter
    def DG(self, graph):
        self._dg = graph
        original = graph.get_all_groups
        frozen = self._frozen_set

        def get_all_groups(ignored_layers=(), root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
            blocking = [m for m in ignored_layers if m not in frozen]
            for group in original(ignored_layers=blocking, root_module_types=root_module_types):
                if group[0].dep.target.module in frozen:
                    group = self._reroot(group, blocking, root_module_types)
                    if group is None:
                        continue
                yield group

        graph.get_all_groups = get_all_groups

    def _reroot(self, group, ignored, root_module_types):
        DG = self._dg
        for dep, _ in group:
            m = dep.target.module
            if (m in self._frozen_set or m in ignored or not isinstance(m, tuple(root_module_types))
                    or not DG.is_out_channel_pruning_fn(dep.handler)):
                continue
            pruner = DG.get_pruner_of_module(m)
            new = DG.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            if _members(new) != _members(group):
                raise RuntimeError(f"re-rooting a group at {module_names(DG)[m]} changed its members")
            return new
        return None  # only frozen layers produce these channels: leave them alone

    def estimate_importance(self, group):
        if not self._scoring_frozen:
            group = group_with_items(group, lambda it: it.dep.target.module not in self._frozen_set)
        return self.importance(group)

    def freeze(self):
        """Keep the frozen layers' parameters out of training (torch-pruning re-creates pruned ones)."""
        for m in self._frozen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
                p.grad = None
