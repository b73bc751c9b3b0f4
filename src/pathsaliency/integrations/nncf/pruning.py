"""Path-magnitude pruning through NNCF's own unstructured-pruning machinery (``nncf/torch/function_hook/pruning``).

``nncf.prune`` wraps the model, finds the prunable constants (the weight of every conv/linear/embedding/
matmul op, minus ``ignored_scope``) and registers an ``UnstructuredPruningMask`` as a post-hook on each
constant (hook key = the constant's name; its boolean buffer ``binary_mask`` multiplies the weight in every
forward).  NNCF fills the masks from ``|w|``; here they are filled from path-magnitude scores instead
(``pathsaliency.path_magnitude``: the fraction of the path-norm lost by removing each weight alone, one unit
across layers and invariant under neuron rescaling) with ``pathsaliency.pruning.masks_from_scores``.
Everything else is NNCF's: ``nncf.pruning_statistic``, ``nncf.batch_norm_adaptation``, ``nncf.strip(model,
strip_format=nncf.StripFormat.IN_PLACE)`` (masks multiplied into the weights, hooks removed; the default
``NATIVE`` format leaves pruning masks as hooks).  ``update_pruning_ratio`` and the two schedulers
recompute the masks from the *current* network (weights times current masks, current batch-norm
statistics), as NNCF's magnitude update does from the current weights.  The pruned model is certified
through ``effective_theta`` (``readback.py``), which applies the masks.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from itertools import chain
from typing import Any, Dict, Iterable, Optional, Tuple

import nncf
import torch
from torch import nn

import pathsaliency
from pathsaliency.lifting import sample_shape
from pathsaliency.pruning import CRITERIA, masks_from_scores, unstructured_scores

from . import _compat
from .quantize import HookSafeSequential
from .readback import _own_tensors

__all__ = [
    "prune",
    "update_pruning_ratio",
    "pruning_masks",
    "PathMagnitudeMultiStepScheduler",
    "PathMagnitudeExponentialScheduler",
]

_SOURCE = "pathsaliency.integrations.nncf"
PruneMode = nncf.PruneMode
_SCOPE_TO_MODE = {
    "global": PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL,
    "local": PruneMode.UNSTRUCTURED_MAGNITUDE_LOCAL,
}
_MODE_TO_SCOPE = {mode: scope for scope, mode in _SCOPE_TO_MODE.items()}


@dataclass
class _PruneState:
    """What ``update_pruning_ratio`` needs to score a pruned model again.

    ``shadow`` is a copy of the architecture (the user's model as given to ``prune``, or NNCF's strip
    of a model pruned elsewhere) that receives the current effective weights before each scoring:
    path-magnitude traces it once (its structure never changes), and it never aliases the pruned
    model's tensors.
    """

    shadow: nn.Module
    input_shape: Tuple[int, ...]
    scope: str
    output: Any = None
    dtype: torch.dtype = torch.float32
    criterion: str = "path-magnitude"
    calibration: Any = None


# Pruned model -> its _PruneState.  Weak keys: the entry goes with the model.  (A deep copy of a
# pruned model is not registered: pass ``input_shape`` to ``update_pruning_ratio`` for it.)
_PRUNED: "weakref.WeakKeyDictionary[nn.Module, _PruneState]" = weakref.WeakKeyDictionary()


def _check_scope(scope: str) -> str:
    if scope not in _SCOPE_TO_MODE:
        raise ValueError(f"{_SOURCE}: scope must be 'global' or 'local', got {scope!r}")
    return scope


def _scope_of_mode(mode: Any) -> str:
    try:
        return _MODE_TO_SCOPE[PruneMode(mode)]
    except (ValueError, KeyError):
        raise ValueError(
            f"{_SOURCE}: path-magnitude pruning supports the modes {sorted(m.value for m in _MODE_TO_SCOPE)} "
            f"(global or per-tensor ranking), got {mode!r}"
        ) from None


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{_SOURCE}: the pruning ratio must be in [0, 1], got {ratio}")
    return ratio


def _mask_hooks(model: nn.Module) -> Dict[str, nn.Module]:
    """``{constant name: UnstructuredPruningMask}`` of an NNCF-pruned model (NNCF's ``get_pruned_modules``)."""
    if not _compat.is_wrapped(model):
        raise ValueError(
            f"{_SOURCE}: the model carries no NNCF hooks; pass the model returned by prune / nncf.prune"
        )
    hooks = _compat.get_pruned_modules(model)
    if not hooks:
        raise ValueError(
            f"{_SOURCE}: the model has no UnstructuredPruningMask hooks (was it pruned with nncf.prune in an "
            "unstructured magnitude mode, or with prune()?)"
        )
    return hooks


def pruning_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The current keep-masks of an NNCF-pruned model: ``{parameter name: bool tensor}`` (copies).

    ``True`` keeps the weight; these are the ``binary_mask`` buffers of NNCF's
    ``UnstructuredPruningMask`` hooks, keyed by NNCF's constant names (the parameter names).
    """
    return {name: hook.binary_mask.detach().clone().bool() for name, hook in _mask_hooks(model).items()}


def _state_for(model: nn.Module, input_shape: Any, scope: Optional[str], **options: Any) -> _PruneState:
    """The remembered state of ``model``, updated with the arguments that are given (not None):
    ``input_shape``, ``scope`` and the ``_PruneState`` fields in ``options`` (``output``, ``dtype``,
    ``criterion``, ``calibration``)."""
    state = _PRUNED.get(model)
    if state is None:
        if input_shape is None:
            raise ValueError(
                f"{_SOURCE}: this model was not pruned by pathsaliency's prune() (or is a copy of one): "
                "pass input_shape (the shape of one input sample, e.g. (3, 32, 32))"
            )
        # a plain copy of the architecture: NNCF's own strip (weights times masks, hooks removed)
        shadow = nncf.strip(model, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)
        state = _PruneState(shadow, sample_shape(input_shape), _check_scope(scope or "global"))
        _PRUNED[model] = state
    if input_shape is not None:
        state.input_shape = sample_shape(input_shape)
    if scope is not None:
        state.scope = _check_scope(scope)
    for name, value in options.items():
        if value is not None:
            setattr(state, name, _check_criterion(value) if name == "criterion" else value)
    return state


def _check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"{_SOURCE}: criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


@torch.no_grad()
def _load_shadow(shadow: nn.Module, model: nn.Module, masks: Optional[Dict[str, torch.Tensor]]) -> None:
    """Copy ``model``'s parameters and buffers into ``shadow``, multiplied by ``masks`` where given."""
    source = _own_tensors(model)
    for name, tensor in _own_tensors(shadow).items():
        value = source.get(name)
        if value is None:
            raise ValueError(f"{_SOURCE}: the pruned model has no tensor {name!r}; was its architecture changed?")
        value = value.detach()
        mask = None if masks is None else masks.get(name)
        if mask is not None:
            value = value * mask.to(device=value.device, dtype=value.dtype)
        tensor.copy_(value)


def _score_keys(state: _PruneState, scores: Dict[str, torch.Tensor], names: Iterable[str]) -> Dict[str, str]:
    """``{NNCF constant name: path_magnitude key}``: the same tensor, matched by name (or by identity
    for a parameter tied under several names).  Raises for a constant that path-magnitude does not score."""
    tensors = _own_tensors(state.shadow)
    by_id = {id(tensors[k]): k for k in scores if k in tensors}
    out, not_param, not_scored = {}, [], []
    for name in names:
        tensor = tensors.get(name)
        if tensor is None:
            not_param.append(name)
        elif name in scores:
            out[name] = name
        elif id(tensor) in by_id:
            out[name] = by_id[id(tensor)]
        else:
            not_scored.append(name)
    if not_param:
        raise ValueError(
            f"{_SOURCE}: NNCF prunes the constants {sorted(not_param)}, which are not parameters or buffers "
            "of the model"
        )
    if not_scored:
        raise ValueError(
            f"{_SOURCE}: NNCF prunes {sorted(not_scored)}, which path-magnitude does not score (it scores the "
            f"weights of conv/linear layers that reach the output: {sorted(scores)}); leave them out with "
            f"ignored_scope=nncf.IgnoredScope(names={sorted(not_scored)!r})"
        )
    return out


def _count(ratio: float, numel: int) -> int:
    return int(round(ratio * numel))  # as pathsaliency.pruning.masks_from_scores


def _scores(state: _PruneState) -> Dict[str, torch.Tensor]:
    """The scores of ``state.criterion`` on the shadow network (higher = keep)."""
    # enable_grad: path_magnitude differentiates the path-norm, and a scheduler may well be stepped
    # inside a ``torch.no_grad()`` block
    with torch.enable_grad():
        if state.criterion == "path-magnitude":
            return pathsaliency.path_magnitude(state.shadow, state.input_shape, output=state.output, dtype=state.dtype)
        return unstructured_scores(state.shadow, state.input_shape, state.criterion, calibration=state.calibration,
                                   output=state.output, dtype=state.dtype)


@torch.no_grad()
def update_pruning_ratio(
    model: nn.Module,
    ratio: float,
    input_shape: Any = None,
    scope: Optional[str] = None,
    *,
    output: Any = None,
    dtype: Optional[torch.dtype] = None,
    criterion: Optional[str] = None,
    calibration: Any = None,
) -> Dict[str, torch.Tensor]:
    """Recompute the ``UnstructuredPruningMask`` masks of ``model`` for ``ratio``, by path-magnitude
    (or the ``criterion`` given to ``prune``).

    The path-magnitude counterpart of NNCF's ``update_pruning_ratio(model, mode, ratio)``
    (``nncf/torch/function_hook/pruning/magnitude/algo.py``).  The scores are those of the
    *current* effective network -- the model's parameters times the current masks, with its
    current buffers (batch-norm statistics after ``nncf.batch_norm_adaptation``), i.e. the network
    ``nncf.strip(model, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)`` gives -- and the
    new keep-masks are ``masks_from_scores(scores, ratio, scope)`` over the pruned tensors (the
    ``round(ratio * n)`` lowest scores removed, globally or per tensor), with one tie rule:
    weights masked now carry nothing in the current network (score 0) and are ranked below every
    unmasked weight, so raising the ratio only adds weights to the pruned set (nested masks).  When
    the ratio goes down, the masked weights brought back are those with the largest path-magnitude
    in the network without masks.  Masked weights keep their stored values (NNCF's masks only
    multiply them), so a weight brought back returns with its value.

    ``input_shape`` (one sample, e.g. ``(3, 32, 32)``), ``scope`` (``"global"`` or ``"local"``),
    ``output`` and ``dtype`` (forwarded to ``pathsaliency.path_magnitude``) default to what
    ``prune`` remembered for this model; given ones replace them for later updates.  A model pruned
    by ``nncf.prune`` directly (or a copy of a pruned model) needs ``input_shape`` (scope default
    ``"global"``).  Hooks other than pruning masks (e.g. quantizers) are not applied when scoring.

    Returns the new masks, ``{parameter name: bool tensor}`` (copies).
    """
    ratio = _check_ratio(ratio)
    hooks = _mask_hooks(model)
    state = _state_for(model, input_shape, scope, output=output, dtype=dtype, criterion=criterion,
                       calibration=calibration)
    current = {name: hook.binary_mask.detach().bool() for name, hook in hooks.items()}

    _load_shadow(state.shadow, model, current)
    scores = _scores(state)
    keys = _score_keys(state, scores, hooks)
    # the order of path_magnitude's keys: the ranking (and its ties) are those of masks_from_scores
    order = {key: i for i, key in enumerate(scores)}
    names = sorted(hooks, key=lambda n: (order[keys[n]], n))

    masked = {n: int((~current[n]).sum()) for n in names}
    if state.scope == "global":
        total = sum(current[n].numel() for n in names)
        revive = _count(ratio, total) < sum(masked.values())
    else:
        revive = any(_count(ratio, current[n].numel()) < masked[n] for n in names)
    dense = None
    if revive:  # the ratio went down: rank the masked weights by their score without masks
        _load_shadow(state.shadow, model, None)
        dense = _scores(state)

    def relative(s: Dict[str, torch.Tensor], n: str) -> torch.Tensor:
        # path_magnitude divides by ||Phi||_1: 0/0 = nan when the current network carries no path at
        # all (e.g. a whole layer masked); removing any weight then loses nothing: score 0
        return torch.nan_to_num(s[keys[n]].detach().to(torch.float64), nan=0.0)

    # scores are >= 0; with top = 1 + the largest, masked weights rank below every unmasked one, in
    # [-2 top, -top) by their dense score when some come back
    top = 1.0 + max(float(relative(s, n).max()) for s in (scores, dense) if s is not None for n in names
                    if s[keys[n]].numel())
    ranking = {}
    for n in names:
        score = relative(scores, n)
        below = relative(dense, n) - 2 * top if dense is not None else torch.full_like(score, -top)
        ranking[n] = torch.where(current[n].to(score.device), score, below.to(score.device))
    new = masks_from_scores(ranking, ratio, state.scope)
    for n in names:
        hooks[n].binary_mask.copy_(new[n].to(hooks[n].binary_mask.device))
    return {n: hooks[n].binary_mask.detach().clone() for n in names}


def prune(
    model: nn.Module,
    ratio: float,
    input_shape: Any,
    *,
    scope: str = "global",
    examples_inputs: Any = None,
    ignored_scope: Optional["nncf.IgnoredScope"] = None,
    output: Any = None,
    dtype: torch.dtype = torch.float32,
    criterion: str = "path-magnitude",
    calibration: Any = None,
) -> nn.Module:
    """Unstructured path-magnitude pruning of a deep copy of ``model`` through ``nncf.prune``.

    NNCF wraps the copy and attaches an ``UnstructuredPruningMask`` to each prunable weight
    (``nncf.prune`` in the ``UNSTRUCTURED_MAGNITUDE_GLOBAL`` / ``_LOCAL`` mode matching ``scope``,
    with ``ignored_scope`` and ``examples_inputs``); the masks are then set to
    ``masks_from_scores(path_magnitude(model, input_shape), ratio, scope)`` restricted to the weights
    NNCF prunes: the ``round(ratio * n)`` weights that carry the least path-norm are masked, over
    all pruned weights together (``"global"``: path-magnitude scores share one unit across layers,
    no per-layer normalisation) or per tensor (``"local"``).

    Args:
        model: float model; never modified.  Every weight NNCF prunes must be a conv/linear weight
            that ``pathsaliency.path_magnitude`` scores (an error names the others; leave them out
            with ``ignored_scope``, whose ``names`` may be parameter names such as ``"conv1.weight"``).
            A top-level plain ``nn.Sequential`` becomes a ``HookSafeSequential``.
        ratio: fraction of the pruned weights to mask, in [0, 1].
        input_shape: the shape of one input sample, e.g. ``(3, 32, 32)``.
        scope: ``"global"`` or ``"local"``.
        examples_inputs: model input NNCF traces; default ``torch.zeros(1, *input_shape)``.
        ignored_scope: ``nncf.IgnoredScope`` of weights (or ops) not to prune.
        output, dtype: forwarded to ``pathsaliency.path_magnitude``.
        criterion: ``"path-magnitude"`` or another of ``pathsaliency.pruning.CRITERIA`` (e.g. the
            rescaling-invariant ``"wanda-lamp"``, which keeps magnitude's accuracy; README), scored by
            ``pathsaliency.pruning.unstructured_scores`` in place of path-magnitude.
        calibration: inputs for the data-aware criteria (a tensor or an iterable of batches).

    Returns:
        The NNCF-pruned copy: ``nncf.pruning_statistic``, ``nncf.batch_norm_adaptation`` and
        ``nncf.strip(..., strip_format=nncf.StripFormat.IN_PLACE)`` work on it as on any NNCF-pruned
        model.  ``input_shape``, ``scope``, ``output`` and ``dtype`` are remembered for
        ``update_pruning_ratio`` and the path-magnitude schedulers.
    """
    _compat.allow_slow_extension_build()
    ratio = _check_ratio(ratio)
    mode = _SCOPE_TO_MODE[_check_scope(scope)]
    shape = sample_shape(input_shape)
    shadow = copy.deepcopy(model)
    work = copy.deepcopy(model)
    if type(work) is nn.Sequential:
        work.__class__ = HookSafeSequential
    if examples_inputs is None:
        first = next(chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype_in = first.dtype if first is not None and first.is_floating_point() else torch.float32
        examples_inputs = torch.zeros((1,) + shape, device=device, dtype=dtype_in)
    pruned = nncf.prune(work, mode, ratio=ratio, ignored_scope=ignored_scope, examples_inputs=examples_inputs)
    with torch.no_grad():  # drop NNCF's magnitude masks: score the dense network
        for hook in _compat.get_pruned_modules(pruned).values():
            hook.binary_mask.fill_(True)
    _PRUNED[pruned] = _PruneState(shadow, shape, scope, output, dtype, _check_criterion(criterion), calibration)
    update_pruning_ratio(pruned, ratio)
    return pruned


class _PathMagnitudeStep:
    """``step`` of NNCF's ``_BaseMagnitudePruningScheduler`` with the mask update by path-magnitude.

    Identical to NNCF's (``nncf/torch/function_hook/pruning/magnitude/schedulers.py``) except that it
    calls this module's ``update_pruning_ratio`` instead of the magnitude one.
    """

    def step(self, epoch: Optional[int] = None) -> None:
        if epoch is None:
            epoch = self.epoch
        else:
            self.epoch = epoch
        self.current_ratio = self.get_pruning_ratio(epoch)
        model = self.ref_model()
        if model is None:
            raise nncf.InternalError("The referenced model is no longer available")
        update_pruning_ratio(model, self.current_ratio, scope=_MODE_TO_SCOPE[self.mode])
        self.epoch += 1


def _scheduler_mode(model: nn.Module, mode: Any) -> PruneMode:
    if mode is not None:
        return _SCOPE_TO_MODE[_scope_of_mode(mode)]
    state = _PRUNED.get(model)
    return _SCOPE_TO_MODE[state.scope if state is not None else "global"]


_MultiStep, _Exponential = _compat.magnitude_schedulers()


class PathMagnitudeMultiStepScheduler(_PathMagnitudeStep, _MultiStep):
    """NNCF's ``MultiStepMagnitudePruningScheduler`` whose ``step()`` recomputes the masks by path-magnitude.

    ``steps`` maps epochs to ratios (must contain 0), as in NNCF.  ``mode`` (an unstructured
    magnitude ``nncf.PruneMode``, global or local) defaults to the scope ``prune`` was called with.
    A model not pruned by ``prune`` needs ``update_pruning_ratio(model, r, input_shape)`` once first.
    """

    def __init__(self, model: nn.Module, *, steps: Dict[int, float], mode: Optional[PruneMode] = None) -> None:
        super().__init__(model, mode=_scheduler_mode(model, mode), steps=steps)


class PathMagnitudeExponentialScheduler(_PathMagnitudeStep, _Exponential):
    """NNCF's ``ExponentialMagnitudePruningScheduler`` whose ``step()`` recomputes the masks by path-magnitude.

    ``ratio(epoch) = 1 - (1 - initial_ratio) * ((1 - target_ratio) / (1 - initial_ratio)) ** (epoch / target_epoch)``
    (NNCF's ``exponential_ratio_scheduler``).  ``mode`` as for ``PathMagnitudeMultiStepScheduler``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        initial_ratio: float,
        target_ratio: float,
        target_epoch: int,
        mode: Optional[PruneMode] = None,
    ) -> None:
        super().__init__(
            model,
            mode=_scheduler_mode(model, mode),
            initial_ratio=initial_ratio,
            target_ratio=target_ratio,
            target_epoch=target_epoch,
        )
