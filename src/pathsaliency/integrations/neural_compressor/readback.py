"""Read back what an INC model computes with: ``effective_theta`` (and its state-dict form ``effective_weights``).

``pathsaliency`` certifies ``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D(theta, theta')`` for a
ReLU network whose *weights* change from ``theta`` to ``theta'``.  For an INC model ``theta'`` is the
reference architecture holding the weights the quantized model really computes with:

* PT2E static INT8 (``quantize_static_int8`` or INC's ``export``/``prepare``/``convert``): each quantized
  weight is the value of its constant ``quantize -> dequantize`` subgraph, evaluated with the graph's own
  ops, scales and zero points; a conv/linear whose batch norm PT2E folded is given to ``Theta.from_folded``
  with its folded values as stored (``pt2e.py``).  Activation quantization is NOT certified
  (``disable_activation_quantizers`` gives the network that is).
* Weight-only RTN (``quantize_weight_only``): INC 3.10's RTN quantizes ``nn.Linear`` only (convolutions
  stay float); each becomes an ``INCWeightOnlyLinear`` with packed integers, whose forward computes with
  ``recover()`` (INC's own unpack + dequantize, fp16) and its fp16 bias: exactly what is read back.
  There is no activation quantization, so the certificate covers the model completely.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
from torch import nn

from .. import _weights
from . import _compat, pt2e

__all__ = ["effective_theta", "effective_weights", "disable_activation_quantizers"]

_SOURCE = "pathsaliency.integrations.neural_compressor"


def _is_weight_only(model: nn.Module) -> bool:
    return any(isinstance(m, _compat.weight_only_linear_types()) for m in model.modules())


@torch.no_grad()
def _woq_parameters(qm: nn.Module, reference: nn.Module) -> Dict[str, torch.Tensor]:
    """``{reference parameter name: value}`` of a weight-only model: ``recover()`` and the stored bias of
    each ``INCWeightOnlyLinear``, every other parameter as stored."""
    ref_params = dict(reference.named_parameters())
    values: Dict[str, torch.Tensor] = {}
    for name, module in qm.named_modules():
        if not isinstance(module, _compat.weight_only_linear_types()):
            continue
        if not hasattr(module, "recover"):
            raise ValueError(f"{_SOURCE}: {type(module).__name__} at {name!r} has no recover() method")
        prefix = f"{name}." if name else ""
        values[prefix + "weight"] = module.recover().float()
        bias = getattr(module, "bias", None)
        if prefix + "bias" in ref_params:
            values[prefix + "bias"] = torch.zeros_like(ref_params[prefix + "bias"]) if bias is None else bias.float()
        elif bias is not None and bool(torch.any(bias != 0)):
            raise ValueError(f"{_SOURCE}: {name!r} has a nonzero bias but the reference layer has none")
    for name, param in qm.named_parameters():
        values.setdefault(name, param.detach())
    return values


def effective_theta(compressed: nn.Module, reference: nn.Module, *, example_inputs: Any = None):
    """``pathsaliency.Theta`` of the network an INC model computes with, on ``reference``'s architecture.

    ``compressed``: a PT2E graph (static INT8) or a weight-only RTN model; ``reference``: the float model
    that was quantized.  ``example_inputs``: the inputs the PT2E graph was exported with, needed to find
    the batch norms PT2E folded when the graph does not carry them (``quantize_static_int8`` leaves them
    on the graph as ``example_inputs``).  Neither model is modified.
    """
    from pathsaliency import Theta

    if pt2e._is_pt2e_quantized(compressed):
        return pt2e.folded_theta(compressed, reference, example_inputs)
    if _is_weight_only(compressed):
        values = _woq_parameters(compressed, reference)
        state = _weights.reference_state(reference, values, dict(compressed.named_buffers()), source=_SOURCE)
        return Theta.from_state_dict(reference, state)
    raise ValueError(f"{_SOURCE}: no INC quantization (PT2E q/dq ops or weight-only modules) found in the model")


def effective_weights(quantized_model: nn.Module, reference: nn.Module, example_inputs: Any = None) -> Dict[str, torch.Tensor]:
    """The network of ``effective_theta`` as a state dict of ``reference``'s unfolded parameters (float32).

    For ``load_effective_weights`` and ``robustness_report(..., effective_weights=...)``: every parameter of
    ``reference`` and its floating buffers (the reference's; raises if the quantized model uses others).
    For PT2E, a weight whose batch norm was folded is divided back by the batch-norm scale (batch norm
    kept), which computes the same function up to float32 rounding; ``effective_theta`` has no such
    rounding.
    """
    if pt2e._is_pt2e_quantized(quantized_model):
        return pt2e.unfolded_state(quantized_model, reference, example_inputs)
    if _is_weight_only(quantized_model):
        values = _woq_parameters(quantized_model, reference)
        _weights.check_buffers(reference, quantized_model.named_buffers(), source=_SOURCE)
        return _weights.assemble_weights(reference, values, source=_SOURCE)
    raise ValueError(f"{_SOURCE}: no INC quantization (PT2E q/dq ops or weight-only modules) found in the model")


def disable_activation_quantizers(quantized_model: nn.Module) -> nn.Module:
    """Copy of ``quantized_model`` computing without activation quantization.

    For a PT2E graph, every ``quantize -> dequantize`` pair on a non-constant tensor is removed (weight
    q/dq pairs are kept).  Weight-only models have no activation quantizers; a plain deep copy is
    returned.  The copy is the network that ``effective_theta`` describes.
    """
    if pt2e._is_pt2e_quantized(quantized_model):
        return pt2e._without_activation_qdq(quantized_model)
    return copy.deepcopy(quantized_model)
