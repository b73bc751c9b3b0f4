"""The effective weights of a quantized model, keyed by the float reference's names (framework-free).

Contract shared by the NNCF and INC read-backs: ``effective_weights`` is ``{every parameter name of the
reference (tied ones under each name) and its floating-point buffers: float32 tensor of the reference's
shape}``, the values the quantized model computes with (:func:`assemble_weights`, :func:`reference_state`);
buffers the framework does not change must equal the reference's (:func:`check_buffers`);
:func:`load_effective_weights` puts the mapping into a copy of the reference (the weights-only model).
"""
from __future__ import annotations

import copy
from itertools import chain
from typing import Dict, Iterable, Mapping, Tuple

import torch
from torch import nn

__all__ = ["assemble_weights", "check_buffers", "load_effective_weights", "reference_state"]


def assemble_weights(
    reference: nn.Module, values: Mapping[str, torch.Tensor], *, source: str
) -> Dict[str, torch.Tensor]:
    """The effective state of ``reference``: ``{name: float32 tensor}``.

    Keys are every parameter name of ``reference`` (tied parameters under each
    of their names) and its floating-point buffers (batch-norm running
    statistics), i.e. what ``pathsaliency.path_metric`` reads from a state dict.
    Parameter values come from ``values`` (keyed by any of a tied parameter's
    names; extra entries are ignored) and must have the reference's shapes;
    buffers are the reference's -- callers check with ``check_buffers`` that the
    quantized model uses the same ones.  Results are detached float32 clones on
    the reference's device, never aliasing the quantized model's storage.
    """
    canonical = {id(p): name for name, p in reference.named_parameters()}
    out: Dict[str, torch.Tensor] = {}
    missing = []
    for name, ref in reference.named_parameters(remove_duplicate=False):
        value = values.get(name)
        if value is None:
            value = values.get(canonical[id(ref)])
        if value is None:
            missing.append(name)
            continue
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"{source}: effective value of {name!r} has shape {tuple(value.shape)}, "
                f"the reference parameter has shape {tuple(ref.shape)}"
            )
        out[name] = value.detach().to(device=ref.device, dtype=torch.float32).clone()
    if missing:
        raise ValueError(
            f"{source}: the quantized model gives no value for the reference parameters {missing}; "
            "is `reference` the float model that was quantized?"
        )
    for name, buf in reference.named_buffers(remove_duplicate=False):
        if torch.is_floating_point(buf):
            out[name] = buf.detach().to(dtype=torch.float32).clone()
    return out


def check_buffers(
    reference: nn.Module, buffers: Iterable[Tuple[str, torch.Tensor]], *, source: str
) -> None:
    """Raise if a floating buffer the quantized model uses differs from the reference's.

    The effective-weight dict only carries parameters; the certificate takes
    buffers (e.g. batch-norm running statistics) from the reference, which is
    only sound if the quantized model did not change them.
    """
    ref_buffers = dict(reference.named_buffers())
    for name, value in buffers:
        ref = ref_buffers.get(name)
        if ref is None or not torch.is_floating_point(ref):
            continue
        if value.shape != ref.shape or not torch.equal(value.detach().to(ref), ref):
            raise ValueError(
                f"{source}: buffer {name!r} of the quantized model differs from the reference's; "
                "the effective-weight mapping only covers parameters"
            )


def load_effective_weights(reference: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Return a deep copy of ``reference`` with its parameters (and any buffers present) from ``weights``.

    Every parameter of ``reference`` must be present in ``weights``; buffers
    missing from ``weights`` stay the reference's.  ``reference`` itself is not
    modified.
    """
    model = copy.deepcopy(reference)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    if missing:
        raise ValueError(f"weights lack the parameters {missing}")
    with torch.no_grad():
        for name, tensor in chain(params.items(), model.named_buffers()):
            value = weights.get(name)
            if value is None:
                continue
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"{name!r}: shape {tuple(value.shape)} != {tuple(tensor.shape)}")
            tensor.copy_(value.to(tensor))
    return model


def reference_state(reference: nn.Module, values: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], *,
                    source: str) -> Dict[str, torch.Tensor]:
    """``{name of reference.state_dict(): tensor}``: the read-back value where ``values`` has one, else the
    quantized model's own tensor of that name (biases, batch-norm statistics); detached, not copied.
    Raises naming the first missing tensors (``reference`` is then not the model that was quantized)."""
    state, missing = {}, []
    for name in reference.state_dict():
        value = values.get(name, own.get(name))
        if value is None:
            missing.append(name)
        else:
            state[name] = value.detach()
    if missing:
        raise ValueError(f"{source}: the compressed model has no tensors {missing[:5]}; is `reference` the float "
                         "model that was compressed?")
    return state
