"""A data-free objective for INC's ``autotune``: the certified bound of each candidate.

``neural_compressor.torch.quantization.autotune(model, tune_config, eval_fn, ...)`` first calls
``eval_fn`` on a deep copy of the float model (the baseline), then, for each configuration of
``TuningConfig.config_set`` in order, quantizes a deep copy of the model and calls ``eval_fn`` on it.
It stops at the first trial with ``result >= baseline * (1 - tolerable_loss)`` (higher is better) or
after ``max_trials``; the model returned is the best trial's.

The certified objective scores a candidate by ``1 - D(theta, theta') / ||Phi(theta)||_1``, with ``theta``
the reference and ``theta'`` the candidate's ``effective_theta``.  The float baseline has ``D = 0`` and
scores exactly 1, so autotune's test reads ``D / ||Phi(theta)||_1 <= tolerable_loss``: ``tolerable_loss``
*is* the largest certified relative path-metric distance accepted, and every accepted model satisfies,
for every input x, ``||R_theta(x) - R_theta'(x)||_1 <= tolerable_loss * max(1, ||x||_inf) * ||Phi(theta)||_1``.
(A log-scale score would give the baseline +inf and break that relative test.)  Only weights are
scored: activation quantization of static configs is not part of the certificate.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field as _field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from neural_compressor.torch.quantization import DynamicQuantConfig, INT8StaticQuantConfig, TuningConfig, autotune
from torch import fx, nn

import pathsaliency
from pathsaliency.lifting import sample_shape

from . import _compat, pt2e
from .quantize import _as_tuple, _call, _model_input
from .readback import _is_weight_only, effective_theta

__all__ = ["certified_eval_fn", "CertifiedObjective", "autotune_certified", "CertifiedTuningResult",
           "NoCertifiedConfigError"]

_SOURCE = "pathsaliency.integrations.neural_compressor"


@dataclass
class CertifiedTrial:
    """One evaluation of the certified objective: ``score = 1 - relative_distance``."""

    relative_distance: float
    score: float
    metric: Any  # pathsaliency.PathMetric
    quantized: bool  # False for a float candidate (autotune's baseline)


class CertifiedObjective:
    """``eval_fn`` for INC's ``autotune``: ``model -> 1 - D(reference, model) / ||Phi(reference)||_1``.

    Made by :func:`certified_eval_fn`.  Calling it with a candidate model returns the score and
    appends a :class:`CertifiedTrial` to ``history`` (autotune's baseline first, then one entry per
    trial); :meth:`certify` returns the ``PathMetric`` of a model without recording it.
    """

    def __init__(
        self,
        reference: nn.Module,
        input_shape: Any,
        *,
        example_inputs: Any = None,
        output: Any = None,
        dtype: torch.dtype = torch.float64,
    ):
        self.reference = reference
        self.input_shape = sample_shape(input_shape)
        self.example_inputs = None if example_inputs is None else _as_tuple(example_inputs)
        self.output = output
        self.dtype = dtype
        self.history: List[CertifiedTrial] = []
        self._foldings: Optional[List[Dict[str, Any]]] = None
        self._last: Optional[Tuple[Any, CertifiedTrial]] = None  # (weakref to the last model scored, its trial)

    def theta(self, model: nn.Module) -> Tuple["pathsaliency.Theta", bool]:
        """``(effective theta, quantized?)`` of a candidate model on the reference's architecture."""
        if isinstance(model, fx.GraphModule):
            # PT2E: exported (baseline), or converted (trial); batch norms PT2E folded stay folded
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.reference.modules())
            if has_bn and self._foldings is None:
                inputs = self.example_inputs or getattr(model, "example_inputs", None)
                if inputs is None:
                    raise ValueError(
                        f"{_SOURCE}: certified_eval_fn needs `example_inputs` (the inputs the model was exported "
                        "with) to find the batch norms PT2E folded"
                    )
                self._foldings = pt2e._bn_foldings(self.reference, _as_tuple(inputs))
            return pt2e.folded_theta(model, self.reference, None, self._foldings), pt2e._is_pt2e_quantized(model)
        if _is_weight_only(model):
            return effective_theta(model, self.reference), True
        # a float model (autotune's baseline): its own tensors on the reference's architecture
        return pathsaliency.Theta.from_state_dict(self.reference, model.state_dict()), False

    def certify(self, model: nn.Module) -> "pathsaliency.PathMetric":
        """The certified distance ``D(reference, model)`` (a ``PathMetric``; ``.relative`` is ``D / ||Phi||``).

        Not recorded in ``history``; the model scored last is not computed again (autotune returns the
        object it scored last when that trial is accepted)."""
        if self._last is not None and self._last[0]() is model:
            return self._last[1].metric
        theta, _ = self.theta(model)
        return pathsaliency.path_metric(self.reference, theta, self.input_shape, output=self.output, dtype=self.dtype)

    def __call__(self, model: nn.Module) -> float:
        theta, quantized = self.theta(model)
        metric = pathsaliency.path_metric(self.reference, theta, self.input_shape, output=self.output, dtype=self.dtype)
        relative = float(metric.relative)
        trial = CertifiedTrial(relative, 1.0 - relative, metric, quantized)
        self.history.append(trial)
        self._last = (weakref.ref(model), trial)
        return trial.score


def certified_eval_fn(
    reference: nn.Module,
    input_shape: Any,
    *,
    example_inputs: Any = None,
    output: Any = None,
    dtype: torch.dtype = torch.float64,
) -> CertifiedObjective:
    """A data-free ``eval_fn`` for INC's ``autotune``: the certified bound of each candidate.

    ``autotune(model, TuningConfig(config_set, tolerable_loss=rho), eval_fn=certified_eval_fn(model,
    input_shape, example_inputs=...), run_fn=..., example_inputs=...)`` accepts the first
    configuration whose certified relative distance ``D / ||Phi(theta)||_1`` is at most ``rho``.

    The score of a candidate is ``1 - D(theta, theta') / ||Phi(theta)||_1`` (higher is better):
    ``theta`` are ``reference``'s parameters, ``theta'`` the weights the candidate computes with
    (``effective_theta``: PT2E static graphs with folded batch norms as folded steps, weight-only
    ``INCWeightOnlyLinear.recover()``; a float candidate is read as it is) and ``D`` the certified
    l1 path-metric (``pathsaliency.path_metric``, float64 by default).  The float baseline scores
    exactly 1, so autotune's acceptance test ``score >= baseline * (1 - tolerable_loss)`` is exactly
    ``D / ||Phi(theta)||_1 <= tolerable_loss`` (up to one rounding of 1.0): set ``tolerable_loss`` to
    the largest relative certified distance you accept.  It guarantees
    ``||R_theta(x) - R_theta'(x)||_1 <= tolerable_loss * max(1, ||x||_inf) * ||Phi(theta)||_1`` for
    every input (``||Phi(theta)||_1`` is ``pathsaliency.path_norm(reference, input_shape)``).  The
    score can be negative (``D`` is at most ``||Phi(theta)|| + ||Phi(theta')||``).

    Args:
        reference: the float model autotune tunes (the ``model`` given to ``autotune``, or the model it
            was exported from); read, never modified.
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)``.
        example_inputs: the inputs the model was exported with; needed for PT2E (static/dynamic)
            configurations when the model has batch norms (PT2E folds them; they are mapped back).
        output, dtype: forwarded to ``pathsaliency.path_metric``.

    Only weight changes are certified: for static (W8A8) configurations the score ignores the
    activation quantization.  No data is used: calibration (``run_fn``) is still what INC needs for
    static activation ranges, but no validation set.
    """
    return CertifiedObjective(reference, input_shape, example_inputs=example_inputs, output=output, dtype=dtype)


@dataclass
class CertifiedTuningResult:
    """What :func:`autotune_certified` chose.

    ``model``: the quantized model autotune returned (a float copy for ``fallback="float"``);
    ``config``: its configuration (``None`` for the float fallback); ``metric``: the certified distance of
    ``model``'s weights to the reference (``metric.relative`` = ``relative_distance``);
    ``within_tolerance``: ``relative_distance <= max_relative_distance``; ``trials``: every configuration
    autotune evaluated, in order, with its certified relative distance.
    """

    model: Optional[nn.Module]
    config: Any
    metric: Any
    relative_distance: float
    max_relative_distance: float
    within_tolerance: bool
    trials: List[Tuple[Any, float]] = _field(default_factory=list)


class NoCertifiedConfigError(ValueError):
    """No configuration's certified relative distance is within the tolerance; ``.result`` holds the
    closest one (what autotune returned) and all the trials."""

    def __init__(self, message: str, result: CertifiedTuningResult):
        super().__init__(message)
        self.result = result


def _uses_pt2e(configs: Any) -> bool:
    items = configs if isinstance(configs, (list, tuple)) else [configs]
    return any(isinstance(c, (INT8StaticQuantConfig, DynamicQuantConfig)) for c in items)


def autotune_certified(
    model: nn.Module,
    configs: Any,
    input_shape: Any,
    example_inputs: Any,
    calibration_data: Optional[Iterable[Any]] = None,
    *,
    max_relative_distance: float,
    run_fn: Optional[Callable[[nn.Module], Any]] = None,
    transform_fn: Optional[Callable[[Any], Any]] = None,
    max_trials: int = 100,
    fallback: str = "raise",
    output: Any = None,
    dtype: torch.dtype = torch.float64,
) -> CertifiedTuningResult:
    """INC ``autotune`` with the certified objective: the first of ``configs`` whose certified
    relative distance ``D / ||Phi(theta)||_1`` is at most ``max_relative_distance``.

    ``configs`` (a config or a list; INC expands list-valued fields) should go from the most to the
    least aggressive: autotune tries them in order and stops at the first accepted one, e.g. all
    layers quantized first, then variants keeping more layers in float
    (``config.set_local("layer3.0.conv1", StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))``).
    The tuning is ``autotune(tuned, TuningConfig(configs, tolerable_loss=max_relative_distance,
    max_trials), eval_fn=certified_eval_fn(model, ...), run_fn, example_inputs)`` where ``tuned`` is
    ``model`` itself for weight-only configs and ``neural_compressor.torch.export.export(model,
    example_inputs)`` for PT2E (static/dynamic INT8) configs; ``model`` is never modified.

    Args:
        model: the float model (also the certificate's reference).
        configs: INC quantization config(s).
        input_shape: one input sample's shape, e.g. ``(3, 32, 32)``.
        example_inputs: model inputs for export / tracing (tensor or tuple).
        calibration_data: iterable of inputs or ``(x, y)`` pairs that ``run_fn`` feeds to the prepared
            model (static configs need it for activation ranges; it is not used to score anything).
            The exported graph is specialised to the shapes of ``example_inputs``: calibration
            batches must have those shapes.
        max_relative_distance: the tolerance on ``D / ||Phi(theta)||_1`` (autotune's ``tolerable_loss``).
        run_fn: calibration function ``run_fn(prepared_model)``; default runs ``calibration_data``.
        transform_fn: maps an item of ``calibration_data`` to the model input (default: first element
            of tuples/lists).
        max_trials: autotune's ``max_trials``.
        fallback: when no configuration is within tolerance: ``"raise"`` (``NoCertifiedConfigError``,
            whose ``.result`` has the closest one), ``"best"`` (return autotune's choice, the closest,
            with ``within_tolerance=False``) or ``"float"`` (return a float copy of ``model``, distance 0).
        output, dtype: forwarded to ``pathsaliency.path_metric``.
    """
    if fallback not in ("raise", "best", "float"):
        raise ValueError(f"{_SOURCE}: fallback must be 'raise', 'best' or 'float', got {fallback!r}")
    rho = float(max_relative_distance)
    if not rho >= 0:
        raise ValueError(f"{_SOURCE}: max_relative_distance must be >= 0, got {max_relative_distance}")
    example_inputs = _as_tuple(example_inputs)
    if run_fn is None and calibration_data is not None:
        transform = transform_fn or _model_input

        def run_fn(prepared: nn.Module) -> None:
            with torch.no_grad():
                for item in calibration_data:
                    _call(prepared, transform(item))

    uses_pt2e = _uses_pt2e(configs)
    if uses_pt2e and run_fn is None:
        raise ValueError(f"{_SOURCE}: static PT2E configurations need calibration_data (or run_fn) for activation ranges")
    work = copy.deepcopy(model).eval()
    objective = certified_eval_fn(model, input_shape, example_inputs=example_inputs, output=output, dtype=dtype)
    if uses_pt2e:
        from neural_compressor.torch.export import export

        work = export(work, example_inputs)
        # the batch norms PT2E may fold, read from this export (saves exporting the reference again)
        objective._foldings = pt2e._bn_foldings(model, example_inputs, exported=work)
    # the configurations autotune will try, in its order (same expansion and de-duplication)
    planned = _compat.expand_configs(configs)
    tune_config = TuningConfig(config_set=configs, tolerable_loss=rho, max_trials=max_trials)
    chosen = autotune(work, tune_config, eval_fn=objective, run_fn=run_fn, example_inputs=example_inputs)

    baseline, evaluated = objective.history[0], objective.history[1:]
    trials = [(cfg, t.relative_distance) for cfg, t in zip(planned, evaluated)]
    # autotune's choice (TuningMonitor): the trial that met `score >= baseline * (1 - tolerable_loss)`
    # (the last one), otherwise the first trial with the highest score
    passed = [i for i, t in enumerate(evaluated) if t.score >= baseline.score * (1 - rho)]
    index = passed[0] if passed else max(range(len(evaluated)), key=lambda i: (evaluated[i].score, -i))
    config = trials[index][0] if index < len(trials) else None
    metric = objective.certify(chosen)  # the returned model itself (autotune may have re-quantized it)
    relative = float(metric.relative)
    result = CertifiedTuningResult(chosen, config, metric, relative, rho, relative <= rho, trials)
    if result.within_tolerance or fallback == "best":
        return result
    if fallback == "float":
        float_model = copy.deepcopy(model).eval()
        return CertifiedTuningResult(float_model, None, objective.certify(float_model), 0.0, rho, True, trials)
    raise NoCertifiedConfigError(
        f"{_SOURCE}: no configuration has a certified relative distance <= {rho:g} "
        f"(closest: {relative:.4g}; tried {[round(r, 6) for _, r in trials]})",
        result,
    )
