"""torch-pruning (>= 1.5, written against 1.6) importance: the exact, rescaling-invariant path-metric.

``PathMetricImportance`` plugs the structured saliency of MATH.md section 6 into torch-pruning::

    import torch_pruning as tp
    from pathsaliency.integrations.torch_pruning import PathMetricImportance

    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=PathMetricImportance(),
                                  pruning_ratio=0.5, global_pruning=True, ignored_layers=[model.fc])
    pruner.step()

How a torch-pruning group becomes :class:`pathsaliency.Removal` items: a ``tp.dependency.Group`` is a list
of ``GroupItem(dep, idxs)`` with ``.root_idxs``; ``dep.target.module`` is the layer that the handler
``dep.handler`` (e.g. ``prune_conv_out_channels``) cuts at the plain channel indices ``idxs``, and
``root_idxs[k]`` is the channel of the group's root layer (``group[0]``) that ``idxs[k]`` belongs to
(several ``idxs`` may share one root index: a flatten before a linear layer). Every item whose layer is a
conv / transposed conv / linear / batch-norm becomes one ``Removal`` (side ``"out"`` for out-channel
handlers and batch-norms, ``"in"`` for in-channel handlers); every other item (additions, concatenations,
reshapes: the dependency graph's bookkeeping nodes) removes no parameter and is skipped. The model is
``group._DG.model`` (the :class:`tp.DependencyGraph` that made the group).
"""
from __future__ import annotations

try:
    import torch_pruning as tp
except ImportError as e:  # pragma: no cover - exercised only without torch-pruning
    raise ImportError("pathsaliency.integrations.torch_pruning needs torch-pruning: "
                      "pip install 'pathsaliency[torch-pruning]'") from e

import weakref

import torch
import torch.nn as nn

from pathsaliency import Removal, channel_saliency

__all__ = ["PathMetricImportance", "group_removals", "channel_groups", "input_shape_from_graph"]

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def channel_groups(group) -> int:
    """The channel grouping that ``MetaPruner`` applies to ``group`` (``BasePruner._get_channel_groups``
    with the grouping it detects by itself): the largest ``groups`` of a grouped, non-depthwise
    convolution of the group (read on the side the group cuts), else 1. ``MetaPruner`` then averages
    the returned scores over the ``k`` copies ``j, j + n/k, j + 2n/k, ...`` of each root channel and
    removes the copies together."""
    DG = group._DG
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


def _root_positions(group):
    """``{root index: position in the returned score vector}``."""
    item = group[0]
    roots = item.root_idxs if item.root_idxs is not None else item.idxs
    return {int(r): i for i, r in enumerate(roots)}, len(roots)


def group_removals(group, names=None, candidate_of_position=None):
    """The :class:`pathsaliency.Removal` items of a torch-pruning group.

    Candidate ``j`` is position ``j`` of the group's root indices (``group[0].root_idxs``), or
    ``candidate_of_position[j]`` when given (channel groups: several root channels are one candidate).
    ``names``: ``{module: qualified name}`` of the dependency graph's model (computed when omitted).
    """
    DG = group._DG
    if names is None:
        names = _names(DG)
    pos, _ = _root_positions(group)
    removals = []
    for i in range(len(group)):
        dep, idxs = group[i]
        m = dep.target.module
        if not isinstance(m, _LAYERS) or len(idxs) == 0:
            continue
        name = names.get(m)
        if name is None:
            raise ValueError(f"a layer of the pruning group ({type(m).__name__}) is not a submodule of the "
                             "dependency graph's model")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or DG.is_out_channel_pruning_fn(dep.handler):
            side = "out"  # also depthwise convs, whose in- and out-channel handlers are one function
        elif DG.is_in_channel_pruning_fn(dep.handler):
            side = "in"
        else:
            raise ValueError(f"unknown pruning function {getattr(dep.handler, '__name__', dep.handler)} "
                             f"on '{name}'")
        roots = group[i].root_idxs
        if roots is None:
            roots = idxs
        index, cand = [], []
        for idx, r in zip(idxs, roots):
            if r is None:  # torch-pruning could not map it back to the root (grouped-query attention)
                raise ValueError(f"torch-pruning gives no root index for channel {idx} of '{name}': the group's "
                                 "candidates cannot be told apart")
            p = pos.get(int(r))
            if p is None:
                raise ValueError(f"root index {r} of '{name}' is not an index of the group's root")
            index.append(int(idx))
            cand.append(p if candidate_of_position is None else int(candidate_of_position[p]))
        if index:
            removals.append(Removal(name, side, torch.tensor(index, dtype=torch.long),
                                    torch.tensor(cand, dtype=torch.long)))
    return removals


def input_shape_from_graph(DG, output=None):
    """The shape of one input sample, read from the dependency graph's trace, or None.

    ``tp.DependencyGraph`` does not keep its ``example_inputs``, but its nodes keep the autograd nodes of
    the traced forward pass, and the conv / linear / batch-norm layers without an input node saved the
    tensor they read. That tensor is the model input only when the model feeds its input straight into
    the layer; this is checked on the model's captured graph (otherwise: None). The batch dimension is
    dropped. None as well when no such layer exists or they disagree.
    """
    from pathsaliency.lifting import lift

    try:
        plan = lift(DG.model, output).plan
    except Exception:  # the model is not supported: channel_saliency will say why
        return None
    direct = set()
    for step in plan.steps:
        if step.input is plan.input:
            direct.update(n for n in (step.module, step.bn) if n is not None)
    names = _names(DG)
    shapes = set()
    for m, node in DG.module2node.items():
        if node.inputs or not isinstance(m, _LAYERS):
            continue
        if names.get(m) not in direct:
            return None
        t = None
        for attr in ("_saved_input", "_saved_mat1", "_saved_self"):
            try:
                t = getattr(node.grad_fn, attr, None)
            except RuntimeError:  # saved tensor already freed
                t = None
            if torch.is_tensor(t):
                break
        if not torch.is_tensor(t) or t.dim() < 2:
            return None
        shapes.add(tuple(t.shape[1:]))
    return shapes.pop() if len(shapes) == 1 else None


def _names(DG) -> dict:
    """``{module: qualified name}`` of the graph's model (the graph's own map: torch-pruning prunes
    modules in place, so it stays valid between steps)."""
    names = getattr(DG, "_module2name", None)
    return names if names else {m: n for n, m in DG.model.named_modules()}


class PathMetricImportance(tp.importance.Importance):
    """Channel importance = the exact l1 path-metric lost by removing the channel (MATH.md section 6).

    For a pruning group of torch-pruning's dependency graph and each channel ``c`` of its root layer, the
    score is::

        score[c] = ( ||Phi(theta)||_1 - ||Phi(theta with S_c removed)||_1 ) / ||Phi(theta)||_1

    where ``S_c`` is everything the group removes with ``c``: the output neurons of every conv / linear /
    batch-norm channel the group cuts at ``c`` (read after a folded batch-norm, so paths that start at
    its shift count) and the edges from every input channel it cuts (all of a flatten's features of
    ``c``). ``||Phi(theta)||_1`` is the l1 path-norm of the ReLU network (frozen batch-norm, max-pooling
    as a window sum). The path-metric bounds the change of the network on every input,
    ``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D``, so the channels of least score are those
    whose removal provably changes the function least. The score is exact (equal to what removing the
    channel physically costs), invariant under the rescaling symmetries of ReLU networks (unlike weight
    magnitudes), and, being the same relative unit for every layer and group, comparable across groups:
    global pruning (``global_pruning=True``) needs no normaliser, so there is no ``group_reduction`` or
    ``normalizer`` option -- the group is scored as a whole, not reduced from per-layer scores.

    Grouped convolutions (ResNeXt): ``MetaPruner`` removes root channels ``j, j + n/k, ...`` (one per
    convolution group, ``k`` groups) together and averages their scores; every one of those ``k`` entries
    then holds the exact score of removing all ``k`` of them together, so the average is that score.

    Args:
        input_shape: shape of one input sample (e.g. ``(3, 224, 224)``; a tensor is accepted). Default:
            read from the dependency graph's trace (the layers that read the model input saved it);
            a ``ValueError`` asks for it when that is not possible.
        exact: True (default) for the exact removal. ``exact=False`` is the cheaper first-order score
            ``sum over v in S_c of fwd(v) * bwd(v)`` (one forward and one backward pass for every
            group at once); it equals the exact score when no path crosses ``S_c`` twice and
            over-counts the paths that do (residual streams, where one channel index lives at several
            depths).
        dtype: torch.float32 (default) or torch.float64 for the path-norm passes.
        output: which output of a model returning a tuple/dict (an index, a key or a callable).
        shard: ``"auto"`` (default): under an initialised ``torch.distributed`` group (``torchrun``) the
            exact scores' removal passes are split across the ranks (identical scores, every rank gets
            them all; :mod:`pathsaliency.distributed`), so every rank must run the same pruner steps.
            ``None`` when only some ranks prune.

    The forward/backward work is cached per model state: scoring every group of a model costs one
    forward and one backward pass of the path-norm network plus batched removal passes for groups that
    are not antichains; after ``pruner.step()`` reshapes the model the scores are recomputed.
    Returns a float64 CPU vector with one score per root index, or None for a group without a
    conv / linear / batch-norm layer.
    """

    def __init__(self, input_shape=None, exact=True, dtype=torch.float32, output=None, shard="auto"):
        self.input_shape = input_shape
        self.exact = exact
        self.dtype = dtype
        self.output = output
        self.shard = shard
        self._derived = weakref.WeakKeyDictionary()  # dependency graph -> input shape read from it

    def _shape(self, DG):
        if self.input_shape is not None:
            return self.input_shape
        shape = self._derived.get(DG)
        if shape is None:
            shape = input_shape_from_graph(DG, self.output)
            if shape is not None:
                self._derived[DG] = shape
        if shape is None:
            raise ValueError("PathMetricImportance could not read the input shape from the dependency graph "
                             "(torch-pruning does not keep example_inputs); pass it: "
                             "PathMetricImportance(input_shape=(3, 224, 224))")
        return shape

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        DG = getattr(group, "_DG", None)
        if DG is None:
            raise ValueError("the group has no dependency graph (group._DG): build it with "
                             "tp.DependencyGraph().get_pruning_group or get_all_groups")
        model = DG.model
        pos, n = _root_positions(group)
        k = channel_groups(group)
        if k > 1 and n % k == 0 and all(pos.get(i) == i for i in range(n)):  # a full group, as MetaPruner's
            size = n // k
            cand_of_pos = torch.arange(n) % size
        else:
            size, cand_of_pos = n, None
        removals = group_removals(group, candidate_of_position=cand_of_pos)
        if not removals:
            return None
        scores = channel_saliency(model, self._shape(DG), removals, size, exact=self.exact,
                                  output=self.output, dtype=self.dtype, shard=self.shard)
        if cand_of_pos is not None:
            scores = scores[cand_of_pos]
        return scores
