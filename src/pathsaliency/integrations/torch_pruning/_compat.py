"""Every access to torch-pruning internals (tested with torch-pruning 1.6), gathered in one place.

torch-pruning's public contract is ``Importance.__call__(group)``, ``DependencyGraph.get_pruning_group`` /
``get_all_groups`` and ``Group.prune``; what the adapter needs beyond it (the graph that made a group,
the graph's module names, the tensors autograd saved while tracing, building a group from items, a group
retargeted at other modules) is read here, so that a torch-pruning release that renames one of them
breaks one file.
"""
from __future__ import annotations

import copy

import torch_pruning as tp

__all__ = ["graph_of", "module_names", "saved_input", "group_with_items", "group_on_modules"]


def graph_of(group):
    """The ``tp.DependencyGraph`` that built ``group`` (``group._DG``); a ``ValueError`` for a group built
    without one."""
    DG = getattr(group, "_DG", None)
    if DG is None:
        raise ValueError("the group has no dependency graph (group._DG): build it with "
                         "tp.DependencyGraph().get_pruning_group or get_all_groups")
    return DG


def module_names(DG) -> dict:
    """``{module: qualified name}`` of the graph's model: the graph's own map (``DG._module2name``:
    torch-pruning prunes modules in place, so it stays valid between steps), else ``named_modules``."""
    names = getattr(DG, "_module2name", None)
    return names if names else {m: n for n, m in DG.model.named_modules()}


def saved_input(grad_fn):
    """The input tensor that the autograd node of a conv / linear / batch-norm saved while the graph was
    traced (``_saved_input``, ``_saved_mat1`` or ``_saved_self``), or None (freed, or none saved)."""
    for attr in ("_saved_input", "_saved_mat1", "_saved_self"):
        try:
            t = getattr(grad_fn, attr, None)
        except RuntimeError:  # saved tensor already freed
            t = None
        if t is not None and hasattr(t, "shape"):
            return t
    return None


def group_with_items(group, keep):
    """A new group of the same graph holding the items of ``group`` for which ``keep(item)`` is true
    (``Group._group`` and ``Group._DG`` are set directly: torch-pruning has no public constructor)."""
    g = tp.dependency.Group()
    g._group = [it for it in group._group if keep(it)]
    g._DG = group._DG
    return g


def group_on_modules(group, module_of):
    """A new group of the same graph whose items target ``module_of(layer)`` instead of each item's layer
    (same handlers, indices and root indices): torch-pruning's importances read ``dep.layer`` of each item
    (``Node`` copied with its ``module`` replaced; ``GroupItem.root_idxs`` set as the graph sets it)."""
    g = tp.dependency.Group()
    g._DG = group._DG
    for item in group._group:
        dep = item.dep
        target = copy.copy(dep.target)
        target.module = module_of(dep.target.module)
        new = tp.dependency.Dependency(dep.trigger, dep.handler, dep.source, target)
        new.index_mapping = dep.index_mapping
        moved = tp._helpers.GroupItem(dep=new, idxs=item.idxs)
        moved.root_idxs = item.root_idxs
        g._group.append(moved)
    return g
