"""A model captured once and its parameters read per call: the object every public function uses.

``lift(model, input_shape)`` returns a :class:`Lifted` from a per-model cache. The cache key is the
model's *structure* (module objects, conv hyper-parameters, tensor shapes), so a repeated call skips
tracing, and a model that torch-pruning has reshaped between two steps is traced again. Parameter
*values* are read from the user's model at every call (the prepared absolute weights are reused while
no tensor has been written to: ``data_ptr`` and ``_version`` unchanged).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from . import params, steps
from .errors import ArchitectureMismatchError, PathSaliencyError
from .graph import capture
from .steps import Weights

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def structure_signature(model: nn.Module, output) -> tuple:
    mods = tuple((name, id(m), type(m), getattr(m, "groups", None)) for name, m in model.named_modules())
    shapes = tuple((name, tuple(t.shape)) for name, t in params.named_tensors(model).items())
    return mods, shapes, repr(output)


def model_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in params.named_tensors(model).values()}
    if not devices:
        return torch.device("cpu")
    if any(d.type == "meta" for d in devices):
        raise PathSaliencyError("the model is on the meta device: its parameters have no values; "
                                "materialise it (e.g. model.to_empty(device=...) and load weights) first")
    if len(devices) > 1:
        raise PathSaliencyError(f"the model's tensors are on several devices ({sorted(map(str, devices))}); "
                                "move it to one device")
    return devices.pop()


def compute_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (got {dtype}); half-precision models "
                         "are computed in one of these")
    return dtype


class Lifted:
    """The validated graph of a model plus the means to read its parameter vector theta."""

    def __init__(self, model: nn.Module, output=None):
        self.device = model_device(model)
        self.plan = capture(model, output)
        self._weights_cache, self._signed_cache = {}, {}

    def sample_shape(self, input_shape) -> tuple:
        """The shape of one sample: ``input_shape`` without a leading batch dimension of 1."""
        shape = tuple(int(s) for s in (input_shape.shape if torch.is_tensor(input_shape) else input_shape))
        first = next((s for s in self.plan.steps if s.input is self.plan.input), None)
        if first is not None and isinstance(first, (steps.ConvStep, steps.ConvTransposeStep)) and shape and shape[0] == 1:
            if len(shape) == first.conv.weight.dim():  # (1, C, *spatial) for a conv with len(spatial)+2 dims
                return shape[1:]
        return shape

    def signed(self, source, dtype) -> dict:
        """node -> signed ``(W, b)`` of every affine step, from a module or a state dict (cached for a
        module while none of its tensors changes)."""
        key = self.state_key(source, dtype) if isinstance(source, nn.Module) else None
        hit = self._signed_cache.get(id(source))
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        out = self._signed(source, dtype)
        if key is not None:
            self._signed_cache = {id(source): (key, out)}
        return out

    def _signed(self, source, dtype) -> dict:
        tensors = params.named_tensors(source)
        names = [n for s in self.plan.steps for n in params.step_tensor_names(s)]
        params.check_finite(tensors, names, "model" if isinstance(source, nn.Module) else "state dict")
        return {node: params.effective(step, tensors, dtype, self.device) for node, step in self.plan.affine.items()}

    @staticmethod
    def state_key(source, dtype) -> tuple:
        """Changes whenever a tensor of ``source`` is replaced or written to in place."""
        tensors = params.named_tensors(source)
        return (dtype,) + tuple((id(t), t.data_ptr(), t._version) for t in tensors.values())

    def absolute(self, source, dtype, q=1) -> dict:
        """node -> :class:`Weights` ``(|W|**q, |b|**q)``, cached while the source tensors are unchanged."""
        key = (q,) + self.state_key(source, dtype)
        hit = self._weights_cache.get(id(source))
        if hit is not None and hit[0] == key:
            return hit[1]
        out = {node: Weights.absolute(w, b, q) for node, (w, b) in self.signed(source, dtype).items()}
        if isinstance(source, nn.Module):
            self._weights_cache = {id(source): (key, out)}
        return out


def lift(model: nn.Module, output=None) -> Lifted:
    """The cached :class:`Lifted` of ``model`` (captured again when its structure changed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    sig = structure_signature(model, output)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    lifted = Lifted(model, output)
    _CACHE[model] = (sig, lifted)
    return lifted


def check_same_architecture(model, lifted: Lifted, other, output=None):
    """``other`` (a module or a state dict) must be theta' of the same architecture: the same graph and
    the same shape for every tensor that theta is made of. Raises :class:`ArchitectureMismatchError`."""
    if isinstance(other, nn.Module):
        theirs = lift(other, output).plan
        mine = [(n.op, str(n.target)) for n in lifted.plan.nodes]
        other_nodes = [(n.op, str(n.target)) for n in theirs.nodes]
        if mine != other_nodes:
            diff = next((i for i, (a, b) in enumerate(zip(mine, other_nodes)) if a != b), min(len(mine), len(other_nodes)))
            a = mine[diff] if diff < len(mine) else "<end>"
            b = other_nodes[diff] if diff < len(other_nodes) else "<end>"
            raise ArchitectureMismatchError(f"the two models have different graphs: node {diff} is {a} in the "
                                            f"first and {b} in the second")
    mine_t, theirs_t = params.named_tensors(model), params.named_tensors(other)
    for step in lifted.plan.steps:
        for name in params.step_tensor_names(step):
            a, b = mine_t.get(name), theirs_t.get(name)
            if (a is None) != (b is None):
                hint = (" (a state dict must hold the buffers too, e.g. batch-norm running statistics: "
                        "{**model.state_dict(), **changed})") if b is None and not isinstance(other, nn.Module) else ""
                raise ArchitectureMismatchError(f"'{name}' exists in only one of the two parameter vectors{hint}")
            if a is not None and tuple(a.shape) != tuple(b.shape):
                raise ArchitectureMismatchError(f"'{name}' has shape {tuple(a.shape)} in the first model and "
                                                f"{tuple(b.shape)} in the second")
