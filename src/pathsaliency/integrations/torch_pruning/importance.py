"""``PathMetricImportance``: torch-pruning's ``Importance.__call__(group) -> 1-D scores``, delegating to the
core's :func:`pathsaliency.channel_saliency`."""
from __future__ import annotations

import sys
import weakref

import torch
import torch_pruning as tp

from pathsaliency import channel_saliency

from ._compat import graph_of
from .groups import channel_groups, group_removals, root_indices
from .input_shape import input_shape_from_graph

__all__ = ["PathMetricImportance", "sequential_scores"]


def sequential_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores for ranking the channels of many groups together (``global_pruning=True``).

    With the group's single-channel scores ``s`` sorted ascending and ``L_r = min(1, s_0 + ... + s_r)``
    (the relative path-metric lost once the ``r + 1`` cheapest channels are gone: exact when their
    neurons share no path, an upper bound otherwise), channel ``r`` scores
    ``(L_r - L_{r-1}) / (1 - L_{r-1})``: the fraction of the path-norm *still there* that it removes
    (running maximum, so the order within the group is kept). The group's most important channel scores
    1 (torch-pruning never empties a layer). Raw single-channel scores favour wide layers (each of 512
    channels carries about 1/512 of the norm), so a global threshold falls above every channel of the
    widest groups; ``MetaPruner`` then refuses those groups whole (``check_pruning_group``) and misses
    its ratio (ResNet-18: 14 % removed for 50 % asked). These scores are in ``[0, 1]``, never constant
    on two or more channels, and make every group give up channels until what it removes of what is
    left reaches one threshold.
    """
    n = len(scores)
    if n == 0:
        return scores.clone()
    order = torch.sort(scores, stable=True).indices
    s = scores[order].to(torch.float64)
    lost = torch.cumsum(s, 0).clamp(max=1.0)
    before = torch.cat([torch.zeros(1, dtype=torch.float64), lost[:-1]])
    left = 1.0 - before
    step = torch.where(left > 0, (lost - before) / left.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.ones_like(left))
    step = step.clamp(0.0, 1.0)
    step[-1] = 1.0
    out = torch.empty_like(step)
    out[order] = torch.cummax(step, 0).values
    return out


def _show_progress(progress) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return sys.stderr is not None and sys.stderr.isatty()


class PathMetricImportance(tp.importance.Importance):
    """Channel importance = the exact l1 path-metric lost by removing the channel (MATH.md section 6).

    For a pruning group of torch-pruning's dependency graph and each channel ``c`` of its root layer, the
    score is::

        score[c] = ( ||Phi(theta)||_1 - ||Phi(theta with S_c removed)||_1 ) / ||Phi(theta)||_1

    where ``S_c`` is everything torch-pruning removes with ``c``: the output neurons of every conv /
    linear / batch-norm channel the group cuts at ``c`` (read after a folded batch-norm, so paths that
    start at its shift count) and the edges from every input channel it cuts (all of a flatten's
    features of ``c``; through an unflatten, the whole block that ``c`` shares a consumer channel with).
    The path-metric bounds the change of the network on every input,
    ``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D``, so the channels of least score are those
    whose removal provably changes the function least. The score is exact (equal to what removing the
    channel physically costs) and invariant under the rescaling symmetries of ReLU networks.

    Grouped convolutions (ResNeXt): ``MetaPruner`` removes root channels ``j, j + n/k, ...`` (one per
    convolution group, ``k`` groups) together and averages their scores; every one of those ``k`` entries
    then holds the exact score of removing all ``k`` of them together, so the average is that score.

    Args:
        input_shape: shape of one input sample (e.g. ``(3, 224, 224)``; a tensor is accepted). Default:
            read from the dependency graph's trace; a ``ValueError`` asks for it when that is not possible.
        exact: True (default) for the exact removal. ``exact=False`` is the cheaper first-order score
            ``sum over v in S_c of fwd(v) * bwd(v)``; it equals the exact score when no path crosses
            ``S_c`` twice and over-counts the paths that do (residual streams).
        dtype: torch.float32 (default) or torch.float64 for the path-norm passes.
        output: which output of a model returning a tuple/dict (an index, a key or a callable).
        sequential: False (default): the single-channel scores above. True: :func:`sequential_scores`
            of them, for ``global_pruning=True`` (same order within each group; ``MetaPruner`` then
            reaches its ratio, which it does not with the raw scores).
        progress: a tqdm bar over the candidates of long exact groups; None (default): on when tqdm is
            installed and stderr is a terminal.
        shard: ``"auto"`` (default): under an initialised ``torch.distributed`` group (``torchrun``) the
            exact scores' removal passes are split across the ranks (identical scores, every rank gets
            them all; :mod:`pathsaliency.distributed`), so every rank must run the same pruner steps.
            ``None`` when only some ranks prune.

    The forward/backward work is cached per model state. Returns a float64 CPU vector with one finite,
    non-negative score per root index, or None for a group without a conv / linear / batch-norm layer.
    """

    def __init__(self, input_shape=None, exact=True, dtype=torch.float32, output=None, sequential=False,
                 progress=None, shard="auto"):
        self.input_shape = input_shape
        self.exact = exact
        self.dtype = dtype
        self.output = output
        self.sequential = sequential
        self.progress = progress
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

    def _saliency(self, model, shape, removals, size, where):
        """``channel_saliency`` of the group; in chunks of candidates under a progress bar when shown."""
        kw = dict(exact=self.exact, output=self.output, dtype=self.dtype, shard=self.shard)
        if not (self.exact and size >= 64 and _show_progress(self.progress)):
            return channel_saliency(model, shape, removals, size, **kw)
        from tqdm.auto import tqdm

        chunk = max(32, size // 16)
        out = []
        with tqdm(total=size, desc=f"path-metric {where}", unit="ch", leave=False) as bar:
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                part = []
                for r in removals:
                    sel = (r.candidate >= start) & (r.candidate < stop)
                    if bool(sel.any()):
                        part.append(type(r)(r.module, r.side, r.index[sel], r.candidate[sel] - start))
                out.append(channel_saliency(model, shape, part, stop - start, **kw))
                bar.update(stop - start)
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        DG = graph_of(group)
        if DG is None:
            raise ValueError("the group has no dependency graph (group._DG): build it with "
                             "tp.DependencyGraph().get_pruning_group or get_all_groups")
        roots = root_indices(group)
        n = len(roots)
        k = channel_groups(group)
        if k > 1 and n % k == 0 and roots == list(range(n)):  # a full group, as MetaPruner's
            size = n // k
            cand_of_pos = torch.arange(n) % size
        else:
            size, cand_of_pos = n, None
        removals = group_removals(group, candidate_of_position=cand_of_pos)
        if not removals:
            return None
        where = removals[0].module
        scores = self._saliency(DG.model, self._shape(DG), removals, size, where)
        if self.sequential:
            scores = sequential_scores(scores)
        if cand_of_pos is not None:
            scores = scores[cand_of_pos]
        return scores
