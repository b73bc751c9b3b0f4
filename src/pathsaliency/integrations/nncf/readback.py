"""Read back what an NNCF model computes with: ``effective_theta`` (and its state-dict form ``effective_weights``).

``pathsaliency`` certifies ``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D(theta, theta')`` for a
ReLU network whose *weights* change from ``theta`` to ``theta'``.  For an NNCF model, ``theta'`` is the
float architecture holding the weights NNCF's model really computes with: every weight NNCF hooks is
passed through its hooks -- weight fake-quantizers of ``nncf.quantize`` (``dequantize(quantize(w))``),
weight decompressors of ``nncf.compress_weights`` (stored integers -> float), pruning masks of
``nncf.prune`` (``w * mask``) -- exactly as the model's forward does; every other tensor (biases moved
by fast bias correction, batch-norm statistics after ``nncf.batch_norm_adaptation``) is the model's own.

What is certified: the weights.  What is NOT certified: activation quantization (``nncf.quantize`` also
puts fake-quantizers on activations; their error depends on the input).  ``disable_activation_quantizers``
returns the model with those turned off: exactly the network the certificate talks about.

How NNCF 3.x represents a compressed torch model (``nncf/torch/function_hook``): a copy of the model, of
the same class, whose ``forward`` is wrapped and which carries a ``HookStorage`` submodule with
``pre_hooks`` and ``post_hooks`` keyed ``"<op name>__<port>"`` (``decode_hook_name``).  Weight quantizers
of PTQ are pre-hooks on the weight port of conv/linear ops; decompressors and pruning masks are
post-hooks on the constant itself (key = the parameter name); activation quantizers are hooks on op
outputs and model inputs.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import _weights
from . import _compat

__all__ = ["effective_theta", "effective_weights", "disable_activation_quantizers", "weight_quantizer_map"]

_SOURCE = "pathsaliency.integrations.nncf"


def _weight_hook_types() -> Tuple[type, ...]:
    """Hooks that only transform the weight they sit on (quantize, decompress, mask)."""
    return _compat.quantizer_types() + (_compat.decompressor_type(),) + _compat.pruning_mask_types()


# ----------------------------------------------------------------------------------------------
# Locating the weight hooks
# ----------------------------------------------------------------------------------------------

# Functions whose weight (and bias) are the module's own parameters when called from the
# forward of these standard torch modules: (module classes, methods that must not be overridden,
# {port id: parameter attribute}).
_STANDARD_WEIGHT_OPS: Dict[str, Tuple[Tuple[type, ...], Tuple[str, ...], Dict[int, str]]] = {
    "conv1d": ((nn.Conv1d,), ("forward", "_conv_forward"), {1: "weight", 2: "bias"}),
    "conv2d": ((nn.Conv2d,), ("forward", "_conv_forward"), {1: "weight", 2: "bias"}),
    "conv3d": ((nn.Conv3d,), ("forward", "_conv_forward"), {1: "weight", 2: "bias"}),
    "conv_transpose1d": ((nn.ConvTranspose1d,), ("forward",), {1: "weight", 2: "bias"}),
    "conv_transpose2d": ((nn.ConvTranspose2d,), ("forward",), {1: "weight", 2: "bias"}),
    "conv_transpose3d": ((nn.ConvTranspose3d,), ("forward",), {1: "weight", 2: "bias"}),
    "linear": ((nn.Linear,), ("forward",), {1: "weight", 2: "bias"}),
    "embedding": ((nn.Embedding,), ("forward",), {1: "weight"}),
}





def _param_at_port_heuristic(model: nn.Module, op_name: str, port: int) -> Optional[str]:
    """Name of the parameter feeding ``port`` of ``op_name``, from names only (no tracing).

    Exact for the standard torch modules of ``_STANDARD_WEIGHT_OPS`` (their
    ``forward`` passes ``self.weight``/``self.bias`` positionally); returns
    ``None`` for ports NNCF does not regard as weight ports; raises when a
    weight port cannot be resolved without tracing.
    """
    parts = op_name.split("/")
    if len(parts) < 2:
        return None  # a model input / output name
    fn_name = parts[-2]
    module_name = ".".join(parts[:-2])
    metatype = _compat.operator_metatype(fn_name)
    weight_ports = set(getattr(metatype, "weight_port_ids", []) or [])
    bias_port = getattr(metatype, "bias_port_id", None)
    if bias_port is not None:
        weight_ports.add(bias_port)
    spec = _STANDARD_WEIGHT_OPS.get(fn_name)
    if spec is not None:
        weight_ports |= set(spec[2])
    if port not in weight_ports:
        return None
    hint = "pass `example_input` so that the weight can be located by tracing the model"
    if spec is None:
        raise ValueError(
            f"{_SOURCE}: a quantizer sits on port {port} of {op_name!r}, a possible weight port of "
            f"a {fn_name!r} op that is not a standard torch module call; {hint}"
        )
    classes, methods, ports = spec
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    base = next((c for c in classes if isinstance(module, c)), None)
    attr = ports.get(port)
    if (
        module is None
        or base is None
        or any(getattr(type(module), m) is not getattr(base, m) for m in methods)
        or attr is None
        or not isinstance(module._parameters.get(attr), nn.Parameter)
    ):
        raise ValueError(
            f"{_SOURCE}: cannot resolve the weight at port {port} of {op_name!r} from module names; {hint}"
        )
    return f"{module_name}.{attr}" if module_name else attr


def _param_at_port_traced(graph: Any, op_name: str, port: int, const_names: set) -> Optional[str]:
    """Name of the parameter feeding ``port`` of ``op_name`` in NNCF's traced graph, or ``None``."""
    node = graph.get_node_by_name(op_name)
    for prev in graph.get_previous_nodes(node):
        for edge in graph.get_edges(prev, node):
            if edge.input_port_id != port:
                continue
            const = _compat.find_const_node(prev, graph)
            if const is None:
                return None
            name = _compat.constant_name(const)
            if name is None:
                raise ValueError(f"{_SOURCE}: unexpected constant node {const.node_name!r}")
            if name not in const_names:
                raise ValueError(f"{_SOURCE}: constant {name!r} feeding {op_name!r} is not a model parameter")
            if prev is not const and not _direct_quantizer_chain(graph, prev, const):
                raise ValueError(
                    f"{_SOURCE}: {name!r} is transformed before it reaches {op_name!r}; "
                    "its effective value cannot be expressed on the parameter"
                )
            return name
    return None


def _direct_quantizer_chain(graph: Any, node: Any, const: Any) -> bool:
    """True if ``node`` is reached from ``const`` only through NNCF's own quantize hook ops."""
    allowed = _compat.weight_subgraph_node_types()
    while node is not const:
        if node.node_type not in allowed:
            return False
        edges = [e for e in graph.get_input_edges(node) if e.input_port_id == 0]
        if len(edges) != 1:
            return False
        node = edges[0].from_node
    return True



@dataclass
class _WeightHooks:
    """Hooks applied to one parameter: post-hooks on the constant, then pre-hooks per consuming port."""

    const_hooks: List[Tuple[str, nn.Module]] = field(default_factory=list)
    port_hooks: Dict[Tuple[str, int], List[Tuple[str, nn.Module]]] = field(default_factory=dict)


def _own_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers by name (tied ones under every name), without NNCF's hook storage."""
    prefix = _compat.hook_storage_attr() + "."
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return {n: t for n, t in out.items() if not n.startswith(prefix)}


def _classify_hooks(
    model: nn.Module, example_input: Any = None
) -> Tuple[Dict[str, _WeightHooks], List[Tuple[str, nn.Module]]]:
    """Split NNCF's hooks into per-parameter weight hooks and the remaining (activation) hooks."""
    if not _compat.is_wrapped(model):
        raise ValueError(
            f"{_SOURCE}: the model carries no NNCF hooks; pass the model returned by nncf.quantize, "
            "nncf.compress_weights, nncf.prune or this module's quantize_int8 / compress_weights / prune"
        )
    const_names = set(_own_tensors(model))
    graph = None
    if example_input is not None:
        with torch.no_grad():
            graph = _compat.build_graph(model, example_input)

    weights: Dict[str, _WeightHooks] = defaultdict(_WeightHooks)
    others: List[Tuple[str, nn.Module]] = []
    for hook_name, hook in _compat.get_hook_storage(model).named_hooks(remove_duplicate=False):
        kind, op_name, port = _compat.decode_hook_name(hook_name)
        if kind == "post_hooks":
            param = op_name if op_name in const_names else None
        elif graph is not None:
            param = _param_at_port_traced(graph, op_name, port, const_names)
        else:
            param = _param_at_port_heuristic(model, op_name, port)
        if param is None:
            others.append((hook_name, hook))
        elif kind == "post_hooks":
            weights[param].const_hooks.append((hook_name, hook))
        else:
            weights[param].port_hooks.setdefault((op_name, port), []).append((hook_name, hook))
    return dict(weights), others


def weight_quantizer_map(quantized_model: nn.Module, example_input: Any = None) -> Dict[str, List[str]]:
    """``{parameter name: [hook names applied to it, in order]}`` for the NNCF hooks on weights.

    Without ``example_input`` the weight behind a pre-hook is found from NNCF's op names (exact for
    standard ``nn.Conv*d``/``nn.ConvTranspose*d``/``nn.Linear``/``nn.Embedding`` modules, otherwise an
    error asks for an input); with it, NNCF's traced graph is used.
    """
    weights, _ = _classify_hooks(quantized_model, example_input)
    return {
        name: [n for n, _ in wh.const_hooks] + [n for hooks in wh.port_hooks.values() for n, _ in hooks]
        for name, wh in weights.items()
    }


def _apply(hooks: List[Tuple[str, nn.Module]], value: torch.Tensor, param_name: str) -> torch.Tensor:
    for hook_name, hook in hooks:
        if not isinstance(hook, _weight_hook_types()):
            raise ValueError(
                f"{_SOURCE}: hook {hook_name!r} ({type(hook).__name__}) on {param_name!r} is not a "
                "quantizer, decompressor or pruning mask; its effect on the weight cannot be read back"
            )
        value = hook(value)
    return value


@torch.no_grad()
def _effective_parameters(model: nn.Module, reference: nn.Module, example_input: Any) -> Dict[str, torch.Tensor]:
    """``{reference parameter name: the value model's forward uses}`` (weight hooks applied)."""
    weights, others = _classify_hooks(model, example_input)
    for hook_name, hook in others:
        if not isinstance(hook, _compat.quantizer_types()):
            raise ValueError(
                f"{_SOURCE}: hook {hook_name!r} ({type(hook).__name__}) is not a quantizer; "
                "the float architecture with effective weights would not reproduce the model"
            )
    tensors = _own_tensors(model)
    values: Dict[str, torch.Tensor] = {}
    for name, _ in reference.named_parameters(remove_duplicate=False):
        if name not in tensors:
            continue  # reported by the caller
        value = tensors[name]
        wh = weights.get(name)
        if wh is not None:
            value = _apply(wh.const_hooks, value, name)
            candidates = [_apply(hooks, value, name) for hooks in wh.port_hooks.values()]
            if candidates:
                if any(not torch.equal(candidates[0], c) for c in candidates[1:]):
                    raise ValueError(
                        f"{_SOURCE}: {name!r} is consumed by several ops that quantize it differently; "
                        "no single effective weight exists"
                    )
                value = candidates[0]
        values[name] = value.detach()
    unknown = set(weights) - set(values)
    if unknown:
        raise ValueError(f"{_SOURCE}: compressed tensors {sorted(unknown)} are not parameters of the reference")
    return values


def effective_theta(compressed: nn.Module, reference: nn.Module, *, example_inputs: Any = None):
    """``pathsaliency.Theta`` of the network an NNCF model computes with, on ``reference``'s architecture.

    ``compressed``: what ``nncf.quantize`` / ``nncf.compress_weights`` / ``nncf.prune`` returned (or this
    module's ``quantize_int8`` / ``compress_weights`` / ``prune``), possibly after ``nncf.strip`` to the
    torch-native format.  Each parameter is the model's stored tensor passed through the hooks NNCF put on
    it, in the model's order (quantizer: ``dequantize(quantize(w))``; decompressor: the stored integers
    dequantized; pruning mask: ``w * mask``); every other parameter and every buffer is the model's own
    (fast-bias-corrected biases, batch-norm statistics after ``nncf.batch_norm_adaptation``).  Batch norms
    are folded by ``Theta.from_state_dict``.

    ``example_inputs``: a model input; when given, NNCF traces the model to locate the weight of each
    pre-hook quantizer exactly; otherwise op names are used (exact for standard torch conv / linear /
    embedding modules, an error asking for it otherwise).  Neither model is modified.  Activation
    quantizers are ignored (not certified); any other kind of hook is an error.
    """
    from pathsaliency import Theta

    values = _effective_parameters(compressed, reference, example_inputs)
    state = _weights.reference_state(reference, values, _own_tensors(compressed), source=_SOURCE)
    return Theta.from_state_dict(reference, state)


def effective_weights(
    quantized_model: nn.Module, reference: nn.Module, example_input: Any = None
) -> Dict[str, torch.Tensor]:
    """The weights of ``effective_theta`` as a state dict of ``reference``'s names (float32, detached).

    For ``load_effective_weights`` and ``robustness_report(..., effective_weights=...)``: every parameter of
    ``reference`` (effective value) and its floating buffers, which must equal the compressed model's
    (raises otherwise: use ``effective_theta`` for models whose batch-norm statistics NNCF changed).
    """
    values = _effective_parameters(quantized_model, reference, example_input)
    buffers = _own_tensors(quantized_model)
    _weights.check_buffers(reference, ((n, b) for n, b in buffers.items() if n not in values), source=_SOURCE)
    return _weights.assemble_weights(reference, values, source=_SOURCE)


def disable_activation_quantizers(quantized_model: nn.Module, example_input: Any = None) -> nn.Module:
    """Deep copy of ``quantized_model`` with every activation (non-weight) quantizer disabled.

    The copy computes the float architecture with the effective (fake-quantized) weights -- the network
    ``effective_theta`` describes.  ``example_input`` is used as in ``effective_theta``.
    """
    model = copy.deepcopy(quantized_model)
    _, others = _classify_hooks(model, example_input)
    for _, hook in others:
        if isinstance(hook, _compat.nncf_quantizer_type()):
            hook.disable_quantization()
        elif isinstance(hook, torch.ao.quantization.FakeQuantizeBase):
            hook.disable_fake_quant()
    return model
