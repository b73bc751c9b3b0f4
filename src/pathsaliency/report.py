"""``robustness_report``: what MATH.md section 7 says a compressed model's report must hold.

For a reference model ``theta`` and a compressed one ``theta'`` the report gives ``log10 ||Phi(theta)||_1``,
the certified distance ``D`` (exact for a dominated pair, case 1, or an upper bound, case 2),
``D / ||Phi(theta)||_1``, the input bound ``max(1, ||x||_inf)`` over the data used, the certified bound
``max(1, ||x||_inf) * D`` on ``||R_theta(x) - R_theta'(x)||_1``, and the deviation actually observed on
that data. Every sample's observed deviation is checked against its own certified bound: one that
exceeds it (beyond float rounding) is a bug, and :class:`CertificateViolation` is raised instead of a
report. The certificate covers **weight** changes only: the deviation of a model that also quantizes
its activations is measured and reported apart, never as certified.
"""
from __future__ import annotations

import copy
import json
import math
import typing
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn as nn

from .errors import PathSaliencyError
from .lifting import lift
from .metric import layer_distances, path_metric
from .params import named_tensors, step_tensor_names

__all__ = ["robustness_report", "RobustnessReport", "LayerDistance", "CertificateViolation"]

TENSOR_BATCH = 256  # a tensor given as ``data`` is evaluated in chunks of this many samples
REL_TOL = 1e-6  # float rounding allowed when checking observed <= certified (relative to the bound) ...
ABS_TOL_EPS = 64  # ... plus this many machine epsilons of the outputs' l1 norms
_RECIPES_HINT = "pip install 'pathsaliency[recipes]'"


class CertificateViolation(PathSaliencyError, AssertionError):
    """An observed deviation exceeds its certified bound: a bug in pathsaliency (or in the effective
    weights handed to it), never a property of the model. No report is produced."""


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
        """A PNG: per-layer certified distance (log scale) next to the observed deviation and the
        certified bound of the whole model."""
        try:
            import matplotlib
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError(f"RobustnessReport.plot needs matplotlib: {_RECIPES_HINT}") from exc
        layers = self.layers or []
        big = [l.distance for l in layers] + [self.distance, self.certified_bound]
        as_log10 = not all(math.isfinite(v) for v in big)  # beyond float64: plot log10 on a linear axis

        def val(v, log10):
            return log10 if as_log10 else v

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(9.0, 5.0 + 0.35 * len(layers)), 5.5),
                                       gridspec_kw={"width_ratios": [max(3.0, 0.35 * len(layers)), 2.5]})
        unit = "log10 " if as_log10 else ""
        if layers:
            ax1.bar(range(len(layers)), [val(l.distance, l.log10_distance) for l in layers], width=0.7,
                    color=["tab:blue" if l.exact else "tab:orange" for l in layers])
            ax1.set_xticks(range(len(layers)))
            ax1.set_xticklabels([l.name for l in layers], rotation=90, fontsize=7)
            if self.distance > 0:
                ax1.axhline(val(self.distance, self.log10_distance), color="k", ls="--", lw=1,
                            label="whole model D")
                ax1.legend(fontsize=8)
        else:
            ax1.text(0.5, 0.5, "per-layer breakdown not computed" if self.layers is None else "no layer changed",
                     ha="center", va="center", transform=ax1.transAxes)
        positive = [l.distance for l in layers if l.distance > 0]
        if not as_log10 and positive:
            ax1.set_yscale("log")
            ax1.set_ylim(bottom=min(positive) / 10)
        ax1.set_xlabel("layer (only this layer compressed; blue: exact, orange: upper bound)")
        ax1.set_ylabel(f"{unit}certified distance D")
        ax1.set_title("Per-layer certified distance")

        names = ["certified\nbound", "observed\nmax", "observed\nmean"]
        values = [self.certified_bound, self.observed_max, self.observed_mean]
        logs = [self.log10_certified_bound, _log10(self.observed_max), _log10(self.observed_mean)]
        colors = ["tab:green", "tab:blue", "tab:cyan"]
        if self.full_model:
            names += ["full model\nmax (not\ncertified)"]
            values += [self.full_observed_max]
            logs += [_log10(self.full_observed_max)]
            colors += ["tab:red"]
        heights = [val(v, lg) for v, lg in zip(values, logs)]
        bars = ax2.bar(range(len(names)), heights, color=colors)
        if self.full_model:
            bars[-1].set_hatch("//")
        ax2.set_xticks(range(len(names)))
        ax2.set_xticklabels(names, fontsize=7)
        if not as_log10 and any(v > 0 for v in values):
            ax2.set_yscale("log")
        ax2.set_ylabel(f"{unit}‖R_θ(x) − R_θ'(x)‖₁")
        ax2.set_title(f"Whole model\n(observed / certified ≤ {self.observed_to_certified:.2g} per sample)", fontsize=10)
        fig.suptitle(f"Robustness report{': ' + self.name if self.name else ''}  "
                     f"(D/‖Φ(θ)‖₁ = {self.relative_distance:.3g}, {'exact' if self.exact else 'upper bound'})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------- helpers (text)

def _log(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else ("-inf" if v < 0 else "inf")


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 else -math.inf


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


# ---------------------------------------------------------------------------------------- helpers (models)

@contextmanager
def _evaluating(models, device):
    """Every module of ``models`` in eval mode, each module's own training flag restored afterwards;
    TF32 off on CUDA so that the observed deviations are float32-accurate."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    tf32 = None
    if device.type == "cuda":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        if tf32 is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _device_of(model: nn.Module) -> torch.device:
    t = next(iter(named_tensors(model).values()), None)
    return t.device if t is not None else torch.device("cpu")


def _dtype_of(model: nn.Module) -> Optional[torch.dtype]:
    return next((t.dtype for t in named_tensors(model).values() if t.is_floating_point()), None)


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` if all of it is on ``device``, else a copy moved there (the user's model never moves)."""
    devices = {t.device for t in named_tensors(model).values()}
    if not devices or devices == {device}:
        return model
    return copy.deepcopy(model).to(device)


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """The same module tree (names and classes) and the same tensor names and shapes."""
    if [(n, type(m)) for n, m in a.named_modules()] != [(n, type(m)) for n, m in b.named_modules()]:
        return False
    ta, tb = named_tensors(a), named_tensors(b)
    return ta.keys() == tb.keys() and all(tuple(ta[k].shape) == tuple(tb[k].shape) for k in ta)


def _weights_only_model(reference: nn.Module, effective_weights) -> nn.Module:
    """A deep copy of ``reference`` holding ``effective_weights`` (parameters and/or buffers by name)."""
    if not hasattr(effective_weights, "items"):
        raise TypeError("effective_weights must be a mapping {tensor name: tensor} (a state dict)")
    model = copy.deepcopy(reference)
    target = named_tensors(model)
    unknown = [k for k in effective_weights if k not in target]
    if unknown:
        raise PathSaliencyError(f"effective_weights has tensors the reference does not: {unknown[:5]}"
                                f"{' ...' if len(unknown) > 5 else ''}")
    with torch.no_grad():
        for name, value in effective_weights.items():
            if not torch.is_tensor(value):
                raise TypeError(f"effective_weights['{name}'] is a {type(value).__name__}, not a tensor")
            t = target[name]
            if tuple(value.shape) != tuple(t.shape):
                raise PathSaliencyError(f"effective_weights['{name}'] has shape {tuple(value.shape)}, the reference "
                                        f"tensor has shape {tuple(t.shape)}")
            t.copy_(value.detach())
    return model


def _select(out, output):
    if output is not None:
        out = output(out) if callable(output) else out[output]
    if not torch.is_tensor(out):
        raise PathSaliencyError(f"the model returns a {type(out).__name__}; choose the tensor with output=...")
    return out


# ---------------------------------------------------------------------------------------- helpers (data)

def _batches(data):
    """Yield ``(x, y or None)``: ``data`` is a tensor, a map-style Dataset, an ``(x, y)`` tuple or an
    iterable of tensors or of ``(x, ...)`` tuples (a DataLoader)."""
    if torch.is_tensor(data):
        for start in range(0, data.shape[0], TENSOR_BATCH):
            yield data[start:start + TENSOR_BATCH], None
        return
    if (isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]) and torch.is_tensor(data[1])
            and not data[1].is_floating_point() and data[1].shape[:1] == data[0].shape[:1]):
        for start in range(0, data[0].shape[0], TENSOR_BATCH):
            yield data[0][start:start + TENSOR_BATCH], data[1][start:start + TENSOR_BATCH]
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=TENSOR_BATCH)
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be a tensor or an iterable of batches, got {type(data).__name__}") from None
    for item in iterator:
        if torch.is_tensor(item):
            yield item, None
        elif isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
            y = item[1] if len(item) > 1 and torch.is_tensor(item[1]) else None
            yield item[0], y
        else:
            raise TypeError(f"each batch must be a tensor or an (x, ...) tuple, got {type(item).__name__}")


def _num_batches(data, max_batches):
    if torch.is_tensor(data):
        n = math.ceil(data.shape[0] / TENSOR_BATCH)
    else:
        try:
            n = len(data)
        except TypeError:
            n = None
    if n is not None and max_batches is not None:
        n = min(n, max_batches)
    return n


class _Stats:
    """Per-sample observed deviations and top-1 counts of one model against the reference."""

    def __init__(self):
        self.dev, self.atol = [], []
        self.agree = self.correct = self.positions = self.labelled = 0

    def add(self, ref_out, out, ref_pred, labels):
        diff = (ref_out.double() - out.double()).reshape(ref_out.shape[0], -1)
        self.dev.append(diff.abs().sum(1).cpu())
        eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
        mag = ref_out.double().reshape(ref_out.shape[0], -1).abs().sum(1) + out.double().reshape(out.shape[0], -1).abs().sum(1)
        self.atol.append((ABS_TOL_EPS * eps * mag).cpu())
        if ref_pred is not None:
            pred = out.argmax(1)
            self.agree += int((pred == ref_pred).sum())
            self.positions += ref_pred.numel()
            if labels is not None:
                self.correct += int((pred == labels).sum())
                self.labelled += labels.numel()

    def deviations(self):
        return torch.cat(self.dev)

    def agreement(self):
        return 100.0 * self.agree / self.positions if self.positions else None

    def accuracy(self):
        return 100.0 * self.correct / self.labelled if self.labelled else None


# ---------------------------------------------------------------------------------------- the report

def robustness_report(reference: nn.Module, compressed: Optional[nn.Module], data, *, effective_weights=None,
                      input_shape=None, output=None, per_layer: bool = True, max_batches: Optional[int] = None,
                      device=None, progress: bool = False, activations_quantized: Optional[bool] = None,
                      name: Optional[str] = None) -> RobustnessReport:
    """The robustness report of ``compressed`` against ``reference`` on ``data`` (MATH.md section 7).

    - Without ``effective_weights``, ``compressed`` has the reference's architecture; it is the
      *weights-only model* whose parameters ``theta'`` are certified.
    - With ``effective_weights`` (a state dict for the reference's architecture, e.g. the dequantized
      weights extracted from an NNCF or INC model; missing tensors keep the reference's values), the
      weights-only model is a copy of ``reference`` holding them, and ``compressed`` (any model, e.g.
      one with activation quantizers, or None) is measured separately as the *full model*: its
      deviation is reported, never certified.
    - ``activations_quantized`` (for the wording): by default True exactly when ``effective_weights`` is
      given and ``compressed`` is not a plain model of the reference's architecture.

    ``data``: a tensor (one or more batches), an ``(x, y)`` tuple, or an iterable of tensors or of
    ``(x, y)`` / ``(x, ...)`` tuples (a DataLoader); ``max_batches`` limits it. Labels (integer tensors)
    give top-1 accuracies. ``input_shape`` (one sample) defaults to the data's; every batch must match it.
    Models are evaluated in eval mode under ``torch.no_grad`` on ``device`` (default: the reference's;
    a model elsewhere is copied there), their training flags restored; nothing is modified.
    ``per_layer``: also the certified distance of each changed layer alone.

    Raises :class:`CertificateViolation` (a bug) if a sample's observed deviation of the weights-only
    model exceeds ``max(1, ||x||_inf) * D`` beyond float rounding.
    """
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}")
    if compressed is not None and not isinstance(compressed, nn.Module):
        raise TypeError(f"compressed must be an nn.Module, got {type(compressed).__name__}")
    if effective_weights is None and compressed is None:
        raise ValueError("give the compressed model, or effective_weights")
    if activations_quantized is None:
        activations_quantized = (effective_weights is not None and compressed is not None
                                 and not _same_architecture(reference, compressed))
    if activations_quantized and effective_weights is None:
        raise ValueError("activations_quantized=True needs effective_weights: the weights whose change is certified "
                         "(the certificate does not cover activation quantization)")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")

    device = torch.device(device) if device is not None else _device_of(reference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ref = _on(reference, device)
    if effective_weights is not None:
        weights_only = _weights_only_model(ref, effective_weights)
        full = _on(compressed, device) if compressed is not None else None
    else:
        weights_only, full = _on(compressed, device), None
    models = [ref, weights_only] + ([full] if full is not None else [])

    batches = _batches(data)
    first = next(batches, None)
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
    metric = path_metric(ref, weights_only, input_shape, output=output)

    total = _num_batches(data, max_batches)
    stream = _chain(first, batches)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(f"progress=True needs tqdm: {_RECIPES_HINT}") from exc
        stream = bar = tqdm(stream, total=total, desc="robustness report")

    scales, ref_correct, labelled = [], 0, 0
    w_stats, f_stats = _Stats(), _Stats()
    try:
        with _evaluating(models, device):
            for b, (x, y) in enumerate(stream):
                if max_batches is not None and b >= max_batches:
                    break
                if tuple(x.shape[1:]) != input_shape:
                    raise PathSaliencyError(f"batch {b} has samples of shape {tuple(x.shape[1:])}, the certificate "
                                            f"is for {input_shape}")
                x = x.to(device)
                outs = []
                for model in models:
                    dt = _dtype_of(model)
                    xm = x.to(dt) if dt is not None and x.is_floating_point() else x
                    out = _select(model(xm), output)
                    if outs and out.shape != outs[0].shape:
                        raise PathSaliencyError(f"the compressed model's output has shape {tuple(out.shape)}, the "
                                                f"reference's {tuple(outs[0].shape)}")
                    outs.append(out)
                scales.append(x.detach().double().reshape(x.shape[0], -1).abs().amax(1).clamp_min(1.0).cpu())
                ref_pred = outs[0].argmax(1) if outs[0].dim() >= 2 else None
                labels = None
                if y is not None and ref_pred is not None and not y.is_floating_point() and y.shape == ref_pred.shape:
                    labels = y.to(ref_pred.device)
                    ref_correct += int((ref_pred == labels).sum())
                    labelled += labels.numel()
                w_stats.add(outs[0], outs[1], ref_pred, labels)
                if full is not None:
                    f_stats.add(outs[0], outs[2], ref_pred, labels)
    finally:
        if bar is not None:
            bar.close()

    scale = torch.cat(scales)
    dev = w_stats.deviations()
    bound = scale * metric.value if metric.log2 != -math.inf else torch.zeros_like(scale)
    _check(dev, bound, torch.cat(w_stats.atol), metric)

    input_bound = float(scale.max())
    log10_bound = math.log10(input_bound) + metric.log10
    ratio = torch.where(dev > 0, dev / bound, torch.zeros_like(dev))  # bound > 0 wherever dev > 0 (checked)
    layers, unchanged = (_per_layer(ref, weights_only, metric, input_shape, output) if per_layer else (None, []))
    f_dev = f_stats.deviations() if full is not None else None
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


def _chain(first, rest):
    yield first
    yield from rest


def _check(dev: torch.Tensor, bound: torch.Tensor, atol: torch.Tensor, metric) -> None:
    """Observed <= certified for every sample, allowing float rounding only."""
    allowed = bound * (1.0 + REL_TOL) + atol
    bad = dev > allowed
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise CertificateViolation(
            f"BUG: the observed deviation of the weights-only model exceeds its certified bound on "
            f"{int(bad.sum())} of {dev.numel()} samples (first: sample {i}, observed {float(dev[i]):.9g} > "
            f"max(1, ||x||_inf) * D = {float(bound[i]):.9g}; D: {metric!r}). MATH.md section 3 says this cannot "
            "happen: the path-metric computation (or the effective weights given) is wrong. No report was "
            "produced; please report this with the models.")


def _per_layer(ref: nn.Module, weights_only: nn.Module, metric, input_shape, output):
    """Certified distance of each changed layer alone (the rest at the reference's values)."""
    plan = lift(ref, output).plan
    ref_t, new_t = named_tensors(ref), named_tensors(weights_only)
    distances = layer_distances(ref, weights_only, input_shape, output=output)
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
