"""``robustness_report``: what MATH.md section 7 says a compressed model's report must hold.

For a reference model ``theta`` and a compressed one ``theta'`` the report gives ``log10 ||Phi(theta)||_1``,
the certified distance ``D`` (exact for a dominated pair, case 1, or an upper bound, case 2),
``D / ||Phi(theta)||_1``, the input bound ``max(1, ||x||_inf)`` over the data used, the certified bound
``max(1, ||x||_inf) * D`` on ``||R_theta(x) - R_theta'(x)||_1``, and the deviation actually observed on
that data. Every sample's observed deviation is checked against its own certified bound: one that
exceeds it (beyond float rounding) is a bug, and :class:`CertificateViolation` is raised instead of a
report. The certificate covers **weight** changes only: the deviation of a model that also quantizes
its activations is measured and reported apart, never as certified.

This module holds the record (:class:`RobustnessReport`, :class:`LayerDistance`), its JSON and Markdown,
and :func:`robustness_report`, which assembles it: the models run in :mod:`pathsaliency.evaluate`, the
check is :func:`pathsaliency.bound.check_bound`, the figure is :mod:`pathsaliency.report_plot`.
"""
from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn as nn

from .bound import CertificateViolation, check_bound, rounding_allowance
from .errors import ArchitectureMismatchError, PathSaliencyError
from .evaluate import batches, deviation, evaluate, input_bounds, num_batches, peek, resolve_device
from .lifting import lift
from .metric import layer_distances, path_metric
from .params import named_tensors, step_tensor_names
from .theta import Theta

__all__ = ["robustness_report", "RobustnessReport", "LayerDistance", "CertificateViolation"]


@dataclass
class LayerDistance:
    """The certified distance when only one affine layer (a conv/linear with its folded batch-norm, or a
    standalone batch-norm) takes its compressed values and every other tensor keeps the reference's."""

    name: str
    tensors: List[str]  # the tensors of this layer that changed
    changed: int  # number of coordinates that differ from the reference
    numel: int  # number of coordinates of the layer's tensors
    log10_distance: float
    distance: float  # inf only where it exceeds float64
    exact: bool
    relative: float  # distance / ||Phi(theta)||_1 of the whole reference


@dataclass
class RobustnessReport:
    """The robustness report of MATH.md section 7. Accuracies and agreements are percentages;
    ``observed_*`` are l1 norms of output differences (max and mean over samples)."""

    name: Optional[str]
    input_shape: List[int]
    num_samples: int
    # the certificate (weights only)
    log10_path_norm: float
    path_norm: float
    log10_distance: float
    distance: float
    exact: bool
    relative_distance: float
    input_bound: float  # max over the samples of max(1, ||x||_inf)
    log10_certified_bound: float
    certified_bound: float  # input_bound * distance
    # measured: the weights-only model (theta' in the reference architecture)
    observed_max: float
    observed_mean: float
    observed_to_certified: float  # max over samples of observed_i / (max(1, ||x_i||_inf) * D)
    agreement: Optional[float]  # top-1 agreement with the reference
    accuracy_reference: Optional[float]
    accuracy_compressed: Optional[float]
    # measured, NOT certified: the compressed model as given (only with effective_weights)
    activations_quantized: bool
    full_model: bool
    full_observed_max: Optional[float]
    full_observed_mean: Optional[float]
    full_agreement: Optional[float]
    full_accuracy: Optional[float]
    # per-layer breakdown (None when not computed)
    layers: Optional[List[LayerDistance]]
    unchanged_layers: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ serialisation
    def to_json(self, indent: Optional[int] = 2) -> str:
        """JSON text; non-finite floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
        return json.dumps(_encode(asdict(self)), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "RobustnessReport":
        """The report :meth:`to_json` wrote (an exact round trip)."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a robustness report in JSON is an object")
        raw = _decode_fields(cls, raw)
        if raw.get("layers") is not None:
            raw["layers"] = [LayerDistance(**_decode_fields(LayerDistance, d)) for d in raw["layers"]]
        return cls(**raw)

    # ------------------------------------------------------------------ text
    def to_markdown(self) -> str:
        title = f"# Robustness report{': ' + self.name if self.name else ''}"
        kind = "exact (case 1: dominated pair)" if self.exact else "certified upper bound (case 2)"
        shape = "x".join(str(s) for s in self.input_shape)
        rows = [
            ("samples used", f"{self.num_samples} (input shape {shape})"),
            ("log10 ‖Φ(θ)‖₁ (l1 path-norm of the reference)", f"{self.log10_path_norm:.6f}"),
            ("certified distance D", f"{_big(self.distance, self.log10_distance)} (log10 = "
                                     f"{_log(self.log10_distance)}), {kind}"),
            ("D / ‖Φ(θ)‖₁", f"{self.relative_distance:.6g}"),
            ("input bound max(1, ‖x‖∞) over the data", f"{self.input_bound:.6g}"),
            ("**certified bound** on ‖R_θ(x) − R_θ'(x)‖₁", f"{_big(self.certified_bound, self.log10_certified_bound)} "
                                                          f"(log10 = {_log(self.log10_certified_bound)})"),
            ("observed ‖R_θ(x) − R_θ'(x)‖₁, weights-only model: max", f"{self.observed_max:.6g}"),
            ("observed, weights-only model: mean", f"{self.observed_mean:.6g}"),
            ("largest observed / certified (per sample)", f"{self.observed_to_certified:.3g}"),
        ]
        if self.agreement is not None:
            rows.append(("top-1 agreement with the reference, weights-only model", f"{self.agreement:.2f}%"))
        if self.accuracy_reference is not None:
            rows.append(("top-1 accuracy, reference", f"{self.accuracy_reference:.2f}%"))
            rows.append(("top-1 accuracy, weights-only model", f"{self.accuracy_compressed:.2f}%"))
        if self.full_model:
            tag = "full model, NOT certified"
            rows.append((f"observed max deviation ({tag})", f"{self.full_observed_max:.6g}"))
            rows.append((f"observed mean deviation ({tag})", f"{self.full_observed_mean:.6g}"))
            if self.full_agreement is not None:
                rows.append((f"top-1 agreement with the reference ({tag})", f"{self.full_agreement:.2f}%"))
            if self.full_accuracy is not None:
                rows.append((f"top-1 accuracy ({tag})", f"{self.full_accuracy:.2f}%"))
        lines = [title, "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        lines += ["", "**What is certified.** For every input x of shape "
                  f"{shape}, ‖R_θ(x) − R_θ'(x)‖₁ ≤ max(1, ‖x‖∞) · D, where θ' are the weights of the compressed "
                  "model run in the reference architecture (the *weights-only model*). The certificate covers "
                  "**weight changes only**. On the data used, every sample's observed deviation was checked "
                  "against its own certified bound."]
        if self.full_model and self.activations_quantized:
            lines += ["", "**Not certified.** The compressed model also quantizes its activations. Its deviation "
                      "(rows marked *full model*) is **measured** on this data only: it is NOT covered by the "
                      "certificate, which is about the weight changes alone."]
        elif self.full_model:
            lines += ["", "The compressed model as given (*full model*) is measured on this data only; the "
                      "certificate is about its effective weights in the reference architecture."]
        if self.layers is not None:
            lines += ["", "## Per layer", "", "Certified distance when only that layer takes its compressed "
                      "values (batch-norm folded into its conv).", "",
                      "| layer | changed / size | D (log10) | D | D / ‖Φ(θ)‖₁ | exact |", "|---|---|---|---|---|---|"]
            lines += [f"| {l.name} | {l.changed} / {l.numel} | {_log(l.log10_distance)} | "
                      f"{_big(l.distance, l.log10_distance)} | {l.relative:.3g} | {'yes' if l.exact else 'no'} |"
                      for l in self.layers]
            if self.unchanged_layers:
                lines += ["", f"Unchanged layers ({len(self.unchanged_layers)}): "
                          + ", ".join(self.unchanged_layers) + "."]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    # ------------------------------------------------------------------ figure
    def plot(self, path) -> None:
        """A PNG of the report (:func:`pathsaliency.report_plot.plot_report`; needs matplotlib)."""
        from .report_plot import plot_report

        plot_report(self, path)

    def save(self, directory) -> None:
        """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory`` (created), all or none
        (:func:`pathsaliency.files.write_atomically`)."""
        from .files import write_atomically

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically({directory / "report.json": self.to_json(), directory / "report.md": self.to_markdown(),
                          directory / "report.png": self.plot})


# ---------------------------------------------------------------------------------------- helpers (text)

def _log(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else ("-inf" if v < 0 else "inf")


def _big(value: float, log10: float) -> str:
    if math.isfinite(value):
        return f"{value:.6g}"
    mant = 10.0 ** (log10 - math.floor(log10))
    return f"{mant:.5f}e+{int(math.floor(log10))}"


def _encode(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode_fields(cls, raw: dict) -> dict:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"unknown field(s) in a {cls.__name__}: {sorted(unknown)}")
    out = dict(raw)
    for name, value in raw.items():
        if hints[name] in (float, Optional[float]):
            if isinstance(value, str):
                if value not in ("inf", "-inf", "nan"):
                    raise ValueError(f"{cls.__name__}.{name}: expected a number, got {value!r}")
                out[name] = float(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                out[name] = float(value)
    return out


# ---------------------------------------------------------------------------------------- the report

def robustness_report(reference: nn.Module, compressed: Optional[nn.Module], data, *, theta: Optional[Theta] = None,
                      effective_weights=None, input_shape=None, output=None, per_layer: bool = True,
                      max_batches: Optional[int] = None, device=None, progress: Optional[bool] = None,
                      activations_quantized: Optional[bool] = None, name: Optional[str] = None) -> RobustnessReport:
    """The robustness report of ``compressed`` against ``reference`` on ``data`` (MATH.md section 7).

    - Without ``theta``, ``compressed`` has the reference's architecture; it is the *weights-only
      model* whose parameters ``theta'`` are certified.
    - With ``theta`` (a :class:`~pathsaliency.Theta` of the reference's architecture, e.g. what an
      integration's ``effective_theta`` read back from an NNCF or INC model), the weights-only model is
      ``theta.to_module()``, and ``compressed`` (any model, e.g. one with activation quantizers, or None)
      is measured separately as the *full model*: its deviation is reported, never certified.
      ``effective_weights`` (a state dict for the reference's architecture; missing tensors keep the
      reference's values) is the same as ``theta=Theta.from_state_dict(reference, {**reference's, **them})``.
    - ``activations_quantized`` (for the wording): whether the full model also quantizes its activations.
      The caller knows (the integrations say it: NNCF and INC static quantization do, weight-only
      compression and pruning do not). Left None, it is False without a full model and, with one,
      True exactly when the full model is not a plain model of the reference's architecture: the cautious
      reading, which says that its deviation is not certified.

    ``data``: a tensor (one or more batches), an ``(x, y)`` tuple, or an iterable of tensors or of
    ``(x, y)`` / ``(x, ...)`` tuples (a DataLoader); ``max_batches`` limits it. Labels (integer tensors)
    give top-1 accuracies. ``input_shape`` (one sample) defaults to the data's; every batch must match it.
    Models are evaluated by :func:`pathsaliency.evaluate.evaluate` on ``device`` (default: the
    reference's); nothing is modified. ``progress``: a tqdm bar (None: when stderr is a terminal).
    ``per_layer``: also the certified distance of each changed layer alone.

    Raises :class:`CertificateViolation` (a bug) if a sample's observed deviation of the weights-only
    model exceeds ``max(1, ||x||_inf) * D`` beyond float rounding (:func:`pathsaliency.bound.check_bound`).
    """
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}")
    if compressed is not None and not isinstance(compressed, nn.Module):
        raise TypeError(f"compressed must be an nn.Module, got {type(compressed).__name__}")
    if theta is not None and effective_weights is not None:
        raise ValueError("give theta or effective_weights, not both")
    if theta is not None and not isinstance(theta, Theta):
        raise TypeError(f"theta must be a pathsaliency.Theta, got {type(theta).__name__}")
    if effective_weights is not None:
        if not hasattr(effective_weights, "items"):
            raise TypeError("effective_weights must be a mapping {tensor name: tensor} (a state dict)")
        known = named_tensors(reference)
        unknown = [k for k in effective_weights if k not in known]
        if unknown:  # an override that names no tensor changes nothing: certifying the reference would hide it
            raise ArchitectureMismatchError(
                f"effective_weights overrides tensors of the reference, but {unknown[:5]} name none of its tensors "
                "(a complete state dict given to path_metric or Theta.from_state_dict may hold unused keys; an "
                "override may not)")
        theta = Theta.from_state_dict(reference, {**known, **effective_weights}, output=output)
    if theta is None and compressed is None:
        raise ValueError("give the compressed model, or theta")
    if activations_quantized is None:
        activations_quantized = (theta is not None and compressed is not None
                                 and not _same_architecture(reference, compressed))
    if activations_quantized and theta is None:
        raise ValueError("activations_quantized=True needs theta (or effective_weights): the weights whose change "
                         "is certified (the certificate does not cover activation quantization)")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")

    device = resolve_device(device, reference)
    weights_only = theta.to_module() if theta is not None else compressed
    full = compressed if theta is not None else None
    models = [reference, weights_only] + ([full] if full is not None else [])

    first, stream = peek(batches(data))
    if first is None:
        raise ValueError("data gave no batch")
    sample_shape = tuple(first[0].shape[1:])
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) == len(sample_shape) + 1 and input_shape[0] == 1:
            input_shape = input_shape[1:]
        if input_shape != sample_shape:
            raise PathSaliencyError(f"the data's samples have shape {sample_shape}, input_shape is {input_shape}: "
                                    "the certificate holds for inputs of one shape")
    input_shape = sample_shape

    # the certificate first: an architecture mismatch fails before any evaluation
    metric = path_metric(reference, theta if theta is not None else weights_only, input_shape, output=output)

    scales, dev, atol, ref_correct, labelled = [], [], [], 0, 0
    w_stats, f_stats = _Agreement(), _Agreement()
    f_dev = []
    for x, y, outs in evaluate(models, stream, device=device, output=output, max_batches=max_batches,
                               total=num_batches(data, max_batches), progress=progress, sample_shape=input_shape,
                               desc="robustness report"):
        scales.append(input_bounds(x))
        dev.append(deviation(outs[0], outs[1]))
        atol.append(rounding_allowance(outs[0], outs[1]))
        ref_pred = outs[0].argmax(1) if outs[0].dim() >= 2 else None
        labels = None
        if y is not None and ref_pred is not None and not y.is_floating_point() and y.shape == ref_pred.shape:
            labels = y.to(ref_pred.device)
            ref_correct += int((ref_pred == labels).sum())
            labelled += labels.numel()
        w_stats.add(outs[1], ref_pred, labels)
        if full is not None:
            f_dev.append(deviation(outs[0], outs[2]))
            f_stats.add(outs[2], ref_pred, labels)

    scale, dev = torch.cat(scales), torch.cat(dev)
    bound = scale * metric.value if metric.log2 != -math.inf else torch.zeros_like(scale)
    check_bound(dev, bound, torch.cat(atol), what="the weights-only model", detail=f"; D: {metric!r}")

    input_bound = float(scale.max())
    log10_bound = math.log10(input_bound) + metric.log10
    ratio = torch.where(dev > 0, dev / bound, torch.zeros_like(dev))  # bound > 0 wherever dev > 0 (checked)
    layers, unchanged = (_per_layer(reference, weights_only, theta, metric, input_shape, output) if per_layer
                         else (None, []))
    f_dev = torch.cat(f_dev) if full is not None else None
    return RobustnessReport(
        name=name, input_shape=list(input_shape), num_samples=int(scale.numel()),
        log10_path_norm=metric.norm.log10, path_norm=metric.norm.value,
        log10_distance=metric.log10, distance=metric.value, exact=bool(metric.exact),
        relative_distance=metric.relative, input_bound=input_bound,
        log10_certified_bound=log10_bound, certified_bound=input_bound * metric.value,
        observed_max=float(dev.max()), observed_mean=float(dev.mean()),
        observed_to_certified=float(ratio.clamp_max(1.0).max()),
        agreement=w_stats.agreement(),
        accuracy_reference=100.0 * ref_correct / labelled if labelled else None,
        accuracy_compressed=w_stats.accuracy(),
        activations_quantized=bool(activations_quantized), full_model=full is not None,
        full_observed_max=float(f_dev.max()) if f_dev is not None else None,
        full_observed_mean=float(f_dev.mean()) if f_dev is not None else None,
        full_agreement=f_stats.agreement() if full is not None else None,
        full_accuracy=f_stats.accuracy() if full is not None else None,
        layers=layers, unchanged_layers=unchanged,
    )


class _Agreement:
    """Top-1 agreement with the reference and top-1 accuracy of one model."""

    def __init__(self):
        self.agree = self.correct = self.positions = self.labelled = 0

    def add(self, out, ref_pred, labels):
        if ref_pred is None:
            return
        pred = out.argmax(1)
        self.agree += int((pred == ref_pred).sum())
        self.positions += ref_pred.numel()
        if labels is not None:
            self.correct += int((pred == labels).sum())
            self.labelled += labels.numel()

    def agreement(self):
        return 100.0 * self.agree / self.positions if self.positions else None

    def accuracy(self):
        return 100.0 * self.correct / self.labelled if self.labelled else None


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """The same module tree (names and classes) and the same stored tensor names and shapes."""
    if [(n, type(m)) for n, m in a.named_modules()] != [(n, type(m)) for n, m in b.named_modules()]:
        return False
    ta, tb = a.state_dict(), b.state_dict()
    return ta.keys() == tb.keys() and all(tuple(ta[k].shape) == tuple(tb[k].shape) for k in ta)

def _per_layer(ref: nn.Module, weights_only: nn.Module, theta, metric, input_shape, output):
    """Certified distance of each changed layer alone (the rest at the reference's values); a layer's
    changed tensors are those of the weights-only model (a layer given folded: its conv/linear and
    batch-norm tensors, see :meth:`Theta.to_module`)."""
    plan = lift(ref, output).plan
    ref_t, new_t = named_tensors(ref), named_tensors(weights_only)
    distances = layer_distances(ref, theta if theta is not None else weights_only, input_shape, output=output)
    layers, unchanged, seen = [], [], set()
    log10_norm = metric.norm.log10
    for step in plan.steps:
        names = tuple(n for n in step_tensor_names(step) if n in ref_t)
        if names in seen:  # a module called twice: one layer
            continue
        seen.add(names)
        changed_names, changed, numel = [], 0, 0
        for n in names:
            a = ref_t[n].detach()
            b = new_t[n].detach().to(device=a.device, dtype=torch.float64)
            a = a.to(torch.float64)
            k = int((a != b).sum())
            numel += a.numel()
            if k:
                changed_names.append(n)
                changed += k
        if not changed_names:
            unchanged.append(step.name)
            continue
        d = distances[step.name]
        rel = 0.0 if d.log2 == -math.inf else 10.0 ** (d.log10 - log10_norm)
        layers.append(LayerDistance(name=step.name, tensors=changed_names, changed=changed, numel=numel,
                                    log10_distance=d.log10, distance=d.value, exact=bool(d.exact), relative=rel))
    return layers, unchanged
