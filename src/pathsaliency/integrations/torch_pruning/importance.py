"""``PathMetricImportance``: torch-pruning's ``Importance.__call__(group) -> 1-D scores``, delegating to the
core's :func:`pathsaliency.channel_saliency`; :func:`normalized_scores` turns a group's single-channel
scores into the scores a pruner ranks."""
from __future__ import annotations

import sys
import weakref

import torch
import torch_pruning as tp

from pathsaliency import channel_saliency

from ._compat import graph_of
from .groups import channel_groups, group_removals, root_indices
from .input_shape import input_shape_from_graph

__all__ = ["PathMetricImportance", "sequential_scores", "normalized_scores", "NORMALIZERS"]

_GAP = 2.0 ** -40  # relative gap that breaks a tie: far above float64 rounding, also after sqrt
NORMALIZERS = (None, "sequential", "sum", "mean", "max", "standarization", "gaussian", "lamp", "sentinel_<q>")


def sequential_scores(scores: torch.Tensor, round_to: int = 1) -> torch.Tensor:
    """Scores for ranking the channels of many groups together (``global_pruning=True``).

    With the group's single-channel scores ``s`` sorted ascending and ``L_r = min(1, s_0 + ... + s_r)``
    (the relative path-metric lost once the ``r + 1`` cheapest channels are gone: exact when their
    neurons share no path, an upper bound otherwise), channel ``r`` scores
    ``(L_r - L_{r-1}) / (1 - L_{r-1})``: the fraction of the path-norm *still there* that it removes.
    The group's most important channel scores 1 (torch-pruning never empties a layer). Raw
    single-channel scores favour wide layers (each of 512 channels carries about 1/512 of the norm), so a
    global threshold falls above every channel of the widest groups; ``MetaPruner`` then refuses those
    groups whole (``check_pruning_group``) and misses its ratio (ResNet-18: 14 % removed for 50 % asked).
    These scores make every group give up channels until what it removes of what is left reaches one
    threshold.

    Order. The scores increase strictly along the raw order (channels of equal raw score in index
    order; zeros stay 0), so a local ranking (one group) picks the channels the raw scores pick: where the
    formula ties (a residual stream's single-channel scores sum to more than 1, and every channel past
    the point where ``L`` reaches 1 would score 1), each channel scores ``1 - 2**-40`` times the one
    above it (a gap that survives ``sqrt``). So the scores lie in ``[0, 1]`` and are never constant on two
    or more channels: a pruner that standardises ``sqrt(scores)`` by ``max - min`` (``GroupNormPruner``)
    never divides 0 by 0.

    ``round_to = k > 1`` (``MetaPruner(round_to=k)``, which rounds every group's remaining channels
    *down* to a multiple of ``k``): the channels come off in blocks that leave a multiple of ``k``
    (the cheapest ``n mod k`` first, then ``k`` at a time), and every channel of a block scores what the
    whole block removes of what is left (in the same strict order inside it; the top ``k`` score 1). A global threshold then
    cuts whole blocks but in one group, so the rounding adds at most ``k - 1`` channels in all instead
    of up to ``k - 1`` in every group.
    """
    n = len(scores)
    if n == 0:
        return scores.clone()
    if int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    order = torch.sort(scores, stable=True).indices
    s = scores[order].to(torch.float64)
    lost = torch.cumsum(s, 0).clamp(max=1.0)
    ends = torch.arange(n)
    if round_to > 1:  # sorted position -> the last position of its block (a cut there leaves a multiple)
        ends = ends + (n - 1 - ends) % int(round_to)
    first = torch.zeros(n, dtype=torch.long)
    first[1:] = torch.where(ends[1:] == ends[:-1], 0, torch.arange(1, n))
    first = first.cummax(0).values  # sorted position -> the first position of its block
    before = torch.cat([torch.zeros(1, dtype=torch.float64), lost])[first]
    lost = lost[ends]
    left = 1.0 - before
    step = torch.where(left > 0, (lost - before) / left.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.ones_like(left))
    step = step.clamp(0.0, 1.0)
    step[ends == n - 1] = 1.0  # the last channel (block): torch-pruning never empties a layer
    step = torch.cummax(step, 0).values.tolist()
    for r in range(n - 2, -1, -1):  # every non-zero score at least a relative _GAP below the next one
        step[r] = min(step[r], step[r + 1] * (1.0 - _GAP))
    out = torch.empty(n, dtype=torch.float64)
    out[order] = torch.tensor(step, dtype=torch.float64)
    return out


def _ratio(a: torch.Tensor, b) -> torch.Tensor:
    """``a / b`` with ``0 / 0 = 0`` (an all-zero group stays all zero instead of NaN)."""
    b = torch.as_tensor(b, dtype=a.dtype)
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _lamp(s: torch.Tensor) -> torch.Tensor:
    """LAMP: each score over the sum of itself and every larger score of the group."""
    order = torch.sort(s, stable=True).indices
    v = s[order]
    tail = torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0])
    out = torch.empty_like(s)
    out[order] = _ratio(v, tail)
    return out


def _never_constant(s: torch.Tensor) -> torch.Tensor:
    """A vector of two or more equal scores ``c`` with its last entry raised by ``|c| * 2**-40`` (to
    ``2**-1000`` from 0): ``GroupNormPruner`` standardises ``sqrt(scores)`` by ``max - min`` without a
    guard, and gets a finite vector instead of 0 / 0; the ranking is a tie broken by index (as
    ``torch.topk`` may break it anyway)."""
    if len(s) < 2 or bool(s.max() > s.min()):
        return s
    s = s.clone()
    c = float(s[-1])
    s[-1] = c + abs(c) * _GAP if c != 0 else 2.0 ** -1000
    return s


def normalized_scores(scores: torch.Tensor, normalizer="sequential", round_to: int = 1) -> torch.Tensor:
    """The group's single-channel scores ``scores`` as a pruner ranks them (float64).

    ``normalizer``: ``"sequential"`` (:func:`sequential_scores` with ``round_to``, the default of
    :class:`PathMetricImportance`); ``None`` (the scores themselves); torch-pruning's
    ``GroupMagnitudeImportance`` normalisers with its formulas: ``"sum"``, ``"mean"``, ``"max"``
    (divide by it), ``"standarization"`` (``(s - min) / (max - min + 1e-8)``), ``"gaussian"``
    (``(s - mean) / (std + 1e-8)``, negative below the mean), ``"lamp"``, ``"sentinel_<q>"`` (divide by the
    ``q``-quantile score); or a callable ``f(scores) -> scores``. Each is rescaling invariant (a function
    of invariant scores). Unlike torch-pruning's, a zero denominator gives 0 instead of NaN, and a result
    constant on two or more channels has its last entry raised a little (:func:`_never_constant`):
    ``GroupNormPruner`` standardises by ``max - min`` without a guard.
    """
    s = scores.to(torch.float64)
    if normalizer == "sequential":
        return sequential_scores(s, round_to)
    if normalizer is None:
        out = s
    elif callable(normalizer):
        out = torch.as_tensor(normalizer(s.clone()), dtype=torch.float64)
        if out.shape != s.shape or not bool(torch.isfinite(out).all()):
            raise ValueError(f"the normalizer {normalizer!r} must return one finite score per channel "
                             f"({len(s)}), got {tuple(out.shape)}"
                             f"{'' if out.shape != s.shape else ' with NaN or inf'}")
    elif len(s) == 0:
        out = s
    elif normalizer == "sum":
        out = _ratio(s, s.sum())
    elif normalizer == "mean":
        out = _ratio(s, s.mean())
    elif normalizer == "max":
        out = _ratio(s, s.max())
    elif normalizer == "standarization":
        out = (s - s.min()) / (s.max() - s.min() + 1e-8)
    elif normalizer == "gaussian":
        std = s.std() if len(s) > 1 else torch.zeros((), dtype=s.dtype)
        out = (s - s.mean()) / (std + 1e-8)
    elif normalizer == "lamp":
        out = _lamp(s)
    elif isinstance(normalizer, str) and normalizer.startswith("sentinel_"):
        q = float(normalizer.split("_", 1)[1])
        if not 0 <= q < 1:
            raise ValueError(f"normalizer {normalizer!r}: the quantile after 'sentinel_' must be in [0, 1)")
        out = s / (torch.sort(s).values[int(q * len(s))] + 1e-8)
    else:
        raise ValueError(f"unknown normalizer {normalizer!r}; choose from {NORMALIZERS} or pass a callable")
    return _never_constant(out)


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
        normalizer: how the group's single-channel scores are returned (:func:`normalized_scores`).
            ``"sequential"`` (default): :func:`sequential_scores`, the fraction of what is left of the
            path-norm that each channel removes once the group's cheaper channels are gone; same strict
            order as the single-channel scores (local pruning picks the same channels), and with
            ``global_pruning=True`` ``MetaPruner`` reaches its ratio (with the raw scores the global
            threshold lies above whole wide groups, which it then refuses: ResNet-18 14 % for 50 %).
            ``None``: the single-channel scores above. Also torch-pruning's ``"sum"``, ``"mean"``,
            ``"max"``, ``"standarization"``, ``"gaussian"``, ``"lamp"``, ``"sentinel_<q>"`` or a callable,
            as in ``GroupMagnitudeImportance`` but never NaN.
        sequential: the older spelling: True is ``normalizer="sequential"``, False ``normalizer=None``.
        round_to: the ``round_to`` given to ``MetaPruner`` (with ``global_pruning=True``). It rounds every
            group's remaining channels down to a multiple of it, after the threshold; with the sequential
            scores (every group keeps about the same number of channels) that removes up to
            ``round_to - 1`` more from every group (a U-Net asked for 50 % keeps 27 %). Given here, the
            sequential scores come in blocks that leave multiples of it (:func:`sequential_scores`), so
            the threshold cuts whole blocks.
        progress: a tqdm bar over the candidates of each group that needs removal passes (the long
            part of an exact ``MetaPruner`` step: residual streams); None (default): on when tqdm is
            installed and stderr is a terminal; False: never.
        shard: ``"auto"`` (default): under an initialised ``torch.distributed`` group (``torchrun``) the
            exact scores' removal passes are split across the ranks (identical scores, every rank gets
            them all; :mod:`pathsaliency.distributed`), so every rank must run the same pruner steps.
            ``None`` when only some ranks prune.

    The forward/backward work is cached per model state. Returns a float64 CPU vector with one finite
    score per root index (non-negative except with ``normalizer="gaussian"``), never constant on two or
    more indices, or None for a group without a conv / linear / batch-norm layer.
    """

    def __init__(self, input_shape=None, exact=True, dtype=torch.float32, output=None, normalizer="sequential",
                 progress=None, shard="auto", sequential=None, round_to=None):
        self.input_shape = input_shape
        self.exact = exact
        self.dtype = dtype
        self.output = output
        if sequential is not None:
            normalizer = "sequential" if sequential else None
        if not (normalizer is None or callable(normalizer)):
            normalized_scores(torch.ones(2), normalizer)  # an unknown name fails here, not inside the pruner
        self.normalizer = normalizer
        self.round_to = 1 if round_to is None else round_to
        sequential_scores(torch.ones(1), self.round_to)  # a bad round_to fails here
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
        """``channel_saliency`` of the group, under a progress bar over the candidates of its removal
        passes when shown (cheap groups need none and show none)."""
        kw = dict(exact=self.exact, output=self.output, dtype=self.dtype, shard=self.shard)
        if not (self.exact and _show_progress(self.progress)):
            return channel_saliency(model, shape, removals, size, **kw)
        from tqdm.auto import tqdm

        bar = None

        def progress(done, total):
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc=f"path-metric {where}", unit="ch", leave=False)
            bar.update(done - bar.n)

        try:
            return channel_saliency(model, shape, removals, size, progress=progress, **kw)
        finally:
            if bar is not None:
                bar.close()

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        DG = graph_of(group)
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
        scores = normalized_scores(scores, self.normalizer, self.round_to)
        if cand_of_pos is not None:
            scores = scores[cand_of_pos]
        return scores
