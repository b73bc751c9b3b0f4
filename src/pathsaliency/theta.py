"""``Theta``: the parameter vector theta of MATH.md section 1 as an object.

theta of one architecture is the folded, signed ``(W, b)`` of every affine step of its graph: a
conv/linear with its frozen batch-norm folded in (``(s * W, s * b + t)``, the folding of
:mod:`pathsaliency.params`), or a standalone batch-norm ``(s, t)``. A ``Theta`` pairs these values with
``reference``, a plain module of the architecture (never modified), so that a compressed model whose
stored tensors are not the ones it computes with (NNCF, INC) can still be certified: its adapter reads
back the effective values and hands them over already folded.

Step name: the conv/linear module's qualified name (its batch-norm folded in), or a standalone
batch-norm's name. ``W`` has the layer's own weight layout (the per-channel scale for a batch-norm);
``b`` is per output channel or None. Values are held in float64 on the reference's device; a
computation in float32 rounds them once.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn as nn

from . import params
from .errors import ArchitectureMismatchError, PathSaliencyError
from .lifting import check_same_architecture, lift

__all__ = ["Theta"]

_DTYPE = torch.float64


class Theta:
    """theta of MATH.md section 1 for one architecture: the folded signed ``(W, b)`` of every affine step.

    Build it with :meth:`from_module`, :meth:`from_state_dict` or :meth:`from_folded`;
    ``layers`` maps each step name to its ``(W, b)``.
    """

    def __init__(self, reference: nn.Module, by_node: dict, output=None, unfolded=None, folded=()):
        """Use the ``from_*`` constructors. ``by_node``: graph node name -> float64 ``(W, b)``;
        ``unfolded``: the step tensors (by name) that the layers not in ``folded`` were folded from."""
        self.reference = reference
        self.output = output
        self._by_node = by_node
        self._unfolded = unfolded
        self._folded = frozenset(folded)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_module(cls, model: nn.Module, *, output=None) -> "Theta":
        """theta of ``model``: its parameters and buffers, batch-norm folded. ``model`` is the reference."""
        return cls._folded_from(model, model, output)

    @classmethod
    def from_state_dict(cls, reference: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                        output=None) -> "Theta":
        """theta of ``state_dict`` (names of ``reference.state_dict()``, buffers included) in the
        architecture of ``reference``; batch-norm folded. Checked by the one architecture check
        (``lifting.check_same_architecture``, as ``path_metric`` does): keys the architecture does not use
        are ignored, a missing tensor or a wrong shape is refused."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of tensor names to tensors, got {type(state_dict).__name__}")
        bad = next((k for k, v in state_dict.items() if not torch.is_tensor(v)), None)
        if bad is not None:
            raise TypeError(f"state_dict['{bad}'] is a {type(state_dict[bad]).__name__}, not a tensor")
        check_same_architecture(reference, lift(reference, output), state_dict, output)
        theirs = params.named_tensors(state_dict)
        return cls._folded_from(reference, theirs, output)

    @classmethod
    def from_folded(cls, reference: nn.Module, layers: Mapping[str, tuple], *, output=None) -> "Theta":
        """theta of ``reference`` with the layers in ``layers`` ({step name: (W, b)}, already folded)
        replaced; the layers not given keep the reference's values. Shapes must be the reference's."""
        base = cls.from_module(reference, output=output)
        steps = lift(reference, output).plan.steps
        by_name = {}
        for step in steps:
            by_name.setdefault(step.name, []).append(step)
        unknown = [k for k in layers if k not in by_name]
        if unknown:
            raise ArchitectureMismatchError(f"from_folded: no affine layer named {unknown[:5]} in the reference "
                                            f"(its layers: {', '.join(list(by_name)[:8])}{', ...' if len(by_name) > 8 else ''})")
        by_node = dict(base._by_node)
        for name, value in layers.items():
            group = by_name[name]
            if len({(s.module, s.bn) for s in group}) > 1:
                raise PathSaliencyError(f"from_folded: layer '{name}' is called with different batch-norms "
                                        "folded in; its folded values are not one (W, b)")
            w, b = _pair(name, value)
            ref_w, ref_b = by_node[group[0].node.name]
            _check_shape(name, "W", w, ref_w)
            if b is not None and ref_b is not None:
                _check_shape(name, "b", b, ref_b)
            elif b is not None:
                raise ArchitectureMismatchError(f"from_folded: layer '{name}' has no bias in the reference, "
                                                f"but b of shape {tuple(b.shape)} was given")
            value = (_as_float64(name, "W", w, ref_w.device),
                     None if b is None else _as_float64(name, "b", b, ref_w.device))
            for step in group:
                by_node[step.node.name] = value
        return cls(reference, by_node, output, base._unfolded, layers)

    @classmethod
    def _folded_from(cls, reference, source, output) -> "Theta":
        """Fold ``source`` (``reference`` itself or a checked state dict for it) with params.py."""
        lifted = lift(reference, output)
        signed = lifted.signed(source, _DTYPE)
        by_node = {node.name: (w.detach().clone(), None if b is None else b.detach().clone())
                   for node, (w, b) in signed.items()}
        tensors = params.named_tensors(source)
        unfolded = {n: tensors[n].detach().clone() for s in lifted.plan.steps for n in params.step_tensor_names(s)
                    if n in tensors}
        return cls(reference, by_node, output, unfolded)

    # ------------------------------------------------------------------ reading
    @property
    def layers(self) -> dict:
        """step name -> signed folded ``(W, b)`` (float64)."""
        out = {}
        for step in lift(self.reference, self.output).plan.steps:
            out.setdefault(step.name, self._by_node[step.node.name])
        return out

    def step_names(self) -> list:
        """The names of the affine steps, in graph order (a module called twice appears once)."""
        return list(self.layers)

    def signed(self, plan, dtype, device) -> dict:
        """node of ``plan`` (a graph of this architecture) -> signed ``(W, b)`` in ``dtype`` on ``device``."""
        missing = [n.name for n in plan.affine if n.name not in self._by_node]
        if missing:
            raise ArchitectureMismatchError(f"this Theta has no values for the graph nodes {missing[:5]}: it was built "
                                            f"for another architecture or another output= (its own: {self.output!r})")
        out = {}
        for node in plan.affine:
            w, b = self._by_node[node.name]
            out[node] = (w.to(device=device, dtype=dtype), None if b is None else b.to(device=device, dtype=dtype))
        return out

    def to_module(self) -> nn.Module:
        """The *weights-only model*: a copy of ``reference`` that computes with theta. Layers built from a
        module or a state dict hold those tensors as given; a layer given folded holds ``(W, b)`` in its
        conv/linear and its batch-norm becomes the exact identity plus ``b`` (mean ``-b``, variance 1,
        ``eps`` 0, scale 1, shift 0)."""
        model = copy.deepcopy(self.reference)
        target = dict(model.named_parameters(remove_duplicate=False))
        target.update(model.named_buffers(remove_duplicate=False))
        modules = dict(model.named_modules())
        written = {}
        with torch.no_grad():
            for step in lift(self.reference, self.output).plan.steps:
                if step.name not in self._folded:
                    for name in params.step_tensor_names(step):
                        if name in self._unfolded:
                            _write(target, name, self._unfolded[name], step.name)
                    continue
                w, b = self._by_node[step.node.name]
                if written.setdefault(step.name, step.node.name) != step.node.name:
                    continue  # a module called again: from_folded gave all its calls one (W, b)
                if step.module is None:  # a standalone batch-norm: s * (x - 0) / sqrt(1 + 0) + t
                    bn = modules[step.bn]
                    _write(target, params.qualified(step.bn, "weight"), w, step.name)
                    _write(target, params.qualified(step.bn, "bias"), b, step.name)
                    _identity_statistics(target, bn, step.bn, None, step.name)
                    continue
                _write(target, params.qualified(step.module, "weight"), w, step.name)
                if step.bn is None:
                    if b is not None:
                        _write(target, params.qualified(step.module, "bias"), b, step.name)
                    continue
                if params.qualified(step.module, "bias") in target:
                    target[params.qualified(step.module, "bias")].zero_()
                bn = modules[step.bn]
                for k in ("weight", "bias"):
                    if params.qualified(step.bn, k) in target:
                        target[params.qualified(step.bn, k)].fill_(1.0 if k == "weight" else 0.0)
                _identity_statistics(target, bn, step.bn, b, step.name)
        return model

    def __repr__(self) -> str:
        n = sum(w.numel() + (0 if b is None else b.numel()) for w, b in self.layers.values())
        return f"Theta({type(self.reference).__name__}, {len(self.layers)} layers, {n} coordinates)"


def _write(target, name, value, layer):
    if name not in target:
        raise PathSaliencyError(f"Theta.to_module: the reference has no plain tensor '{name}' (layer '{layer}'); "
                                "build the Theta on a plain (unpruned, unparametrized) reference")
    target[name].copy_(value.to(target[name]))


def _identity_statistics(target, bn, name, shift, layer):
    """Batch-norm statistics for ``(x - mean) / sqrt(var + eps) = x + shift`` exactly (``shift`` None: 0)."""
    mean = f"{name}.running_mean"
    _write(target, mean, torch.zeros_like(target[mean]) if shift is None else -shift, layer)
    target[f"{name}.running_var"].fill_(1.0)
    bn.eps = 0.0


def _pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"from_folded: layers['{name}'] must be a pair (W, b) with b a tensor or None")
    return value[0], value[1]


def _check_shape(layer, what, t, ref):
    if not torch.is_tensor(t):
        raise TypeError(f"from_folded: {what} of layer '{layer}' is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != tuple(ref.shape):
        raise ArchitectureMismatchError(f"from_folded: layer '{layer}': {what} has shape {tuple(t.shape)}, the "
                                        f"reference's folded {what} has shape {tuple(ref.shape)}")


def _as_float64(layer, what, t, device):
    if not t.is_floating_point():
        raise PathSaliencyError(f"from_folded: {what} of layer '{layer}' is {t.dtype}: give the dequantized "
                                "floating-point values, not the integer storage")
    t = t.detach().to(device=device, dtype=_DTYPE)
    if not torch.isfinite(t).all():
        raise PathSaliencyError(f"from_folded: {what} of layer '{layer}' has NaN or infinite values")
    return t.clone()
