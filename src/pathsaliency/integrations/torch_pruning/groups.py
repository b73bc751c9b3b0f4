"""A torch-pruning group as the core's :class:`pathsaliency.Removal` items: which channels each candidate
removes.

A ``tp.dependency.Group`` is a list of ``GroupItem(dep, idxs)`` with ``.root_idxs``: ``dep.target.module``
is the layer that the handler ``dep.handler`` (e.g. ``prune_conv_out_channels``) cuts at the plain
channel indices ``idxs``, and ``root_idxs[k]`` is the channel of the group's root layer (``group[0]``) that
``idxs[k]`` belongs to (several ``idxs`` may share one root index: a flatten before a linear layer).
Candidate ``j`` is position ``j`` of the root's indices. Every item whose layer is a conv / transposed
conv / linear / batch-norm becomes one ``Removal`` (side ``"out"`` for out-channel handlers and
batch-norms, ``"in"`` for in-channel handlers); the other items (additions, concatenations, reshapes:
the graph's bookkeeping nodes) remove no parameter and are skipped.

The ``root_idxs`` map is what torch-pruning's own pruning does only when every root index removes the
channels mapped to it. Through an unflatten (``Linear(4096) -> view(256, 4, 4) -> ConvTranspose``)
removing root index ``c`` physically removes channel ``c // 16`` of the consumer and, with it, all 16
features of that block, while the group records one representative root per consumer channel. Such a
group is detected by asking torch-pruning for the group of a few single root indices
(``get_pruning_group(root, handler, [c])``) and comparing; when they differ, every candidate's removal is
read from its own single-index group (exact, one graph traversal per candidate).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pathsaliency import Removal

from ._compat import graph_of, module_names

__all__ = ["LAYERS", "channel_groups", "group_removals", "root_indices"]

LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def channel_groups(group) -> int:
    """The channel grouping that ``MetaPruner`` applies to ``group`` (``BasePruner._get_channel_groups``
    with the grouping it detects by itself): the largest ``groups`` of a grouped, non-depthwise
    convolution of the group (read on the side the group cuts), else 1. ``MetaPruner`` then averages
    the returned scores over the ``k`` copies ``j, j + n/k, j + 2n/k, ...`` of each root channel and
    removes the copies together."""
    DG = graph_of(group)
    best = 1
    for dep, _ in group:
        m = dep.target.module
        if not isinstance(m, nn.Module):
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
            continue  # depthwise: MetaPruner does not group those
        pruner = DG.get_pruner_of_module(m)
        if pruner is None:
            continue
        if DG.is_out_channel_pruning_fn(dep.handler):
            g = pruner.get_out_channel_groups(m)
        else:
            g = pruner.get_in_channel_groups(m)
        best = max(best, int(g or 1))
    return best


def root_indices(group) -> list:
    """The root layer's channel indices of ``group``, one per candidate (``group[0].root_idxs``)."""
    item = group[0]
    roots = item.root_idxs if item.root_idxs is not None else item.idxs
    return [int(r) for r in roots]


def _side(DG, dep, m, name) -> str:
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or DG.is_out_channel_pruning_fn(dep.handler):
        return "out"  # also depthwise convs, whose in- and out-channel handlers are one function
    if DG.is_in_channel_pruning_fn(dep.handler):
        return "in"
    raise ValueError(f"unknown pruning function {getattr(dep.handler, '__name__', dep.handler)} on '{name}'")


def _cuts(group, names):
    """``[(layer name, side, [(index, root index), ...])]`` for the parameterised items of ``group``."""
    DG = graph_of(group)
    out = []
    for i in range(len(group)):
        dep, idxs = group[i]
        m = dep.target.module
        if not isinstance(m, LAYERS) or len(idxs) == 0:
            continue
        name = names.get(m)
        if name is None:
            raise ValueError(f"a layer of the pruning group ({type(m).__name__}) is not a submodule of the "
                             "dependency graph's model")
        roots = group[i].root_idxs
        if roots is None:
            roots = idxs
        pairs = []
        for idx, r in zip(idxs, roots):
            if r is None:  # torch-pruning could not map it back to the root (grouped-query attention)
                raise ValueError(f"torch-pruning gives no root index for channel {idx} of '{name}': the group's "
                                 "candidates cannot be told apart")
            pairs.append((int(idx), int(r)))
        out.append((name, _side(DG, dep, m, name), pairs))
    return out


def _single(group, root):
    """torch-pruning's own group for removing root index ``root`` alone."""
    DG = graph_of(group)
    return DG.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, [root])


def _removed_by(cuts, root):
    return {(name, side, idx) for name, side, pairs in cuts for idx, r in pairs if r == root}


def _mapping_is_physical(group, cuts, names, roots) -> bool:
    """True when removing single root indices (first, middle, last) removes exactly the channels that the
    group's ``root_idxs`` map to them."""
    for r in {roots[0], roots[len(roots) // 2], roots[-1]}:
        physical = {(name, side, idx) for name, side, pairs in _cuts(_single(group, r), names) for idx, _ in pairs}
        if physical != _removed_by(cuts, r):
            return False
    return True


def group_removals(group, names=None, candidate_of_position=None):
    """The :class:`pathsaliency.Removal` items of a torch-pruning group.

    Candidate ``j`` is position ``j`` of the group's root indices (:func:`root_indices`), or
    ``candidate_of_position[j]`` when given (channel groups: several root channels are one candidate).
    ``names``: ``{module: qualified name}`` of the dependency graph's model (computed when omitted).
    """
    if names is None:
        names = module_names(graph_of(group))
    roots = root_indices(group)
    pos = {r: i for i, r in enumerate(roots)}
    cuts = _cuts(group, names)
    if cuts and roots and not _mapping_is_physical(group, cuts, names, roots):
        # several root indices share their channels (an unflatten): each candidate from its own group
        cuts = [(name, side, [(idx, r) for idx, _ in pairs]) for r in roots
                for name, side, pairs in _cuts(_single(group, r), names)]
    merged = {}
    for name, side, pairs in cuts:
        index, cand = merged.setdefault((name, side), ([], []))
        for idx, r in pairs:
            p = pos.get(r)
            if p is None:
                raise ValueError(f"root index {r} of '{name}' is not an index of the group's root")
            index.append(idx)
            cand.append(p if candidate_of_position is None else int(candidate_of_position[p]))
    return [Removal(name, side, torch.tensor(index, dtype=torch.long), torch.tensor(cand, dtype=torch.long))
            for (name, side), (index, cand) in merged.items() if index]
