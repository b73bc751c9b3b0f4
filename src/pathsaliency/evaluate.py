"""Running models on data: the *observed* side of a certificate.

:func:`evaluate` runs several models on the same batches, in eval mode under ``torch.no_grad`` on one
device, with TF32 off on CUDA (so that observed deviations are float32-accurate), every module's
training flag and the TF32 settings restored afterwards; a model elsewhere is copied to the device, the
user's model never moves. :func:`outputs` collects one model's outputs, labels and input bounds
``max(1, ||x_i||_inf)``; :func:`deviation` is the per-sample ``||R_theta(x_i) - R_theta'(x_i)||_1``.

``data``: a tensor (split into batches of ``TENSOR_BATCH``), an ``(x, y)`` pair of tensors with integer
labels, a map-style Dataset, or an iterable of tensors or of ``(x, ...)`` tuples (a DataLoader).
``progress``: a tqdm bar; None (default) shows one when tqdm is installed and stderr is a terminal.
"""
from __future__ import annotations

import copy
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Iterator, List, Optional

import torch
import torch.nn as nn

from .errors import PathSaliencyError
from .precision import ieee_float32

__all__ = ["Outputs", "outputs", "evaluate", "deviation", "batches", "num_batches", "evaluating"]

TENSOR_BATCH = 256  # a tensor given as ``data`` is evaluated in chunks of this many samples
_RECIPES_HINT = "pip install 'pathsaliency[recipes]'"


@dataclass
class Outputs:
    """One model's outputs on the data (CPU), the labels (None without labels) and
    ``max(1, ||x_i||_inf)`` per sample (float64)."""

    outputs: torch.Tensor
    labels: Optional[torch.Tensor]
    input_bounds: torch.Tensor


def outputs(model: nn.Module, data, *, device=None, output=None, max_batches: Optional[int] = None,
            progress: Optional[bool] = None) -> Outputs:
    """:class:`Outputs` of ``model`` on ``data`` (see the module docstring)."""
    device = resolve_device(device, model)
    outs, labels, bounds = [], [], []
    for x, y, (out,) in evaluate([model], batches(data), device=device, output=output, max_batches=max_batches,
                                 total=num_batches(data, max_batches), progress=progress):
        outs.append(out.cpu())
        labels.append(y)
        bounds.append(input_bounds(x))
    if not outs:
        raise ValueError("data gave no batch")
    y = torch.cat([t.cpu() for t in labels]) if all(t is not None for t in labels) else None
    return Outputs(torch.cat(outs), y, torch.cat(bounds))


def evaluate(models: List[nn.Module], stream: Iterable, *, device: torch.device, output=None,
             max_batches: Optional[int] = None, total: Optional[int] = None, progress: Optional[bool] = None,
             sample_shape=None, desc: str = "evaluate") -> Iterator:
    """Yield ``(x, y, [output of each model])`` for each ``(x, y)`` of ``stream`` (at most
    ``max_batches``), ``x`` on ``device``. With ``sample_shape``, a batch of another shape is an error."""
    models = [on(m, device) for m in models]
    bar = progress_bar(stream, total, desc, progress)
    try:
        with evaluating(models):
            for b, (x, y) in enumerate(bar):
                if max_batches is not None and b >= max_batches:
                    break
                if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
                    raise PathSaliencyError(f"batch {b} has samples of shape {tuple(x.shape[1:])}, the certificate "
                                            f"is for {tuple(sample_shape)}")
                x = x.to(device)
                outs = []
                for model in models:
                    dt = dtype_of(model)
                    out = select(model(x.to(dt) if dt is not None and x.is_floating_point() else x), output)
                    if outs and out.shape != outs[0].shape:
                        raise PathSaliencyError(f"the compressed model's output has shape {tuple(out.shape)}, the "
                                                f"reference's {tuple(outs[0].shape)}")
                    outs.append(out)
                yield x, y, outs
    finally:
        if hasattr(bar, "close"):
            bar.close()


def deviation(ref_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per sample ``||ref_out_i - out_i||_1`` in float64 (on the CPU)."""
    return (ref_out.double() - out.double()).reshape(ref_out.shape[0], -1).abs().sum(1).cpu()


def input_bounds(x: torch.Tensor) -> torch.Tensor:
    """Per sample ``max(1, ||x_i||_inf)`` in float64 (on the CPU)."""
    return x.detach().double().reshape(x.shape[0], -1).abs().amax(1).clamp_min(1.0).cpu()


def progress_bar(iterable, total, desc, progress: Optional[bool]):
    """``iterable`` wrapped in a tqdm bar: always for True (tqdm required), never for False, and for None
    when tqdm is installed and stderr is a terminal."""
    if progress is False or (progress is None and not _is_terminal()):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        if progress is None:
            return iterable
        raise ImportError(f"progress=True needs tqdm: {_RECIPES_HINT}") from exc
    return tqdm(iterable, total=total, desc=desc)


def _is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# ---------------------------------------------------------------------------------------- data

def batches(data) -> Iterator:
    """Yield ``(x, y or None)`` from ``data`` (see the module docstring)."""
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


def num_batches(data, max_batches: Optional[int] = None) -> Optional[int]:
    """The number of batches :func:`batches` yields (at most ``max_batches``), None if unknown."""
    if torch.is_tensor(data):
        n = math.ceil(data.shape[0] / TENSOR_BATCH)
    elif isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]) and torch.is_tensor(data[1]):
        n = math.ceil(data[0].shape[0] / TENSOR_BATCH)
    else:
        try:
            n = len(data)
        except TypeError:
            n = None
    if n is not None and max_batches is not None:
        n = min(n, max_batches)
    return n


def peek(stream: Iterator):
    """``(first item, an iterator over all items)``; the first item is None for an empty stream."""
    first = next(stream, None)
    return first, (chain([first], stream) if first is not None else iter(()))


# ---------------------------------------------------------------------------------------- models

@contextmanager
def evaluating(models):
    """Every module of ``models`` in eval mode under ``torch.no_grad``, each module's own training flag
    restored afterwards; IEEE float32 on CUDA (:func:`pathsaliency.precision.ieee_float32`: no TF32) so
    that the observed deviations are float32-accurate."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.no_grad(), ieee_float32():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _stored(model: nn.Module):
    """The stored tensors of any module (a compressed one too: only their device and dtype are read)."""
    return chain(model.parameters(), model.buffers())


def device_of(model: nn.Module) -> torch.device:
    t = next(_stored(model), None)
    return t.device if t is not None else torch.device("cpu")


def resolve_device(device, model: nn.Module) -> torch.device:
    """``device`` (default: ``model``'s), a bare ``cuda`` made ``cuda:<current>``."""
    device = torch.device(device) if device is not None else device_of(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def dtype_of(model: nn.Module) -> Optional[torch.dtype]:
    return next((t.dtype for t in _stored(model) if t.is_floating_point()), None)


def on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` if all of it is on ``device``, else a copy moved there (the user's model never moves)."""
    devices = {t.device for t in _stored(model)}
    if not devices or devices == {device}:
        return model
    return copy.deepcopy(model).to(device)


def select(out, output):
    """The output tensor: ``output`` (a callable or an index) applied to what the model returns."""
    if output is not None:
        out = output(out) if callable(output) else out[output]
    if not torch.is_tensor(out):
        raise PathSaliencyError(f"the model returns a {type(out).__name__}; choose the tensor with output=...")
    return out
