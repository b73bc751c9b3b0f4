"""NNCF post-training INT8 quantization, read back as effective float weights.

``pathsaliency`` certifies ``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D(theta, theta')``
for a ReLU network whose *weights* change from ``theta`` to ``theta'``.  For a
model quantized by NNCF, ``theta'`` is the float architecture loaded with the
weights the quantized model really computes with: every weight that NNCF
fake-quantizes is replaced by ``dequantize(quantize(w))``, obtained by running
NNCF's own weight quantizer module on the stored weight, and every other
parameter (including biases moved by NNCF's fast bias correction) is copied
from the quantized model.

What is certified: the effect of weight quantization (and of any bias/weight
change NNCF made).  What is NOT certified: activation quantization -- NNCF also
inserts fake-quantizers on activations, whose rounding error is input dependent
and outside the path-metric bound.  ``disable_activation_quantizers`` returns
the quantized model with those turned off, which is exactly the network the
certificate talks about (the proof tests compare the two).

How NNCF 3.x represents a quantized torch model (``nncf/torch/function_hook``):
``nncf.quantize`` returns a copy of the model, of the same class, whose
``forward`` is wrapped (``ForwardWithHooks``) and which carries a
``HookStorage`` submodule ``__nncf_hooks`` with two ``nn.ModuleDict``\\ s,
``pre_hooks`` and ``post_hooks``, keyed ``"<op name>__<port>"`` (op names such
as ``layer1/0/conv1/conv2d/0``, with ``.`` written ``:``).  Weight quantizers
are ``SymmetricQuantizer`` pre-hooks on the weight port of conv/linear ops
(per-output-channel scale, ``narrow_range``), activation quantizers are
``SymmetricQuantizer``/``AsymmetricQuantizer`` post-hooks on op outputs and
model inputs.  Weight-compression / stripped formats put hooks as post-hooks on
the parameter itself (key = parameter name); they are handled too.

Only quantization lives in this module.
"""
from __future__ import annotations

try:
    import nncf
except ImportError as e:  # pragma: no cover - exercised only without NNCF
    raise ImportError("pathsaliency.integrations.nncf needs NNCF: pip install 'pathsaliency[nncf]'") from e

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from nncf.torch.function_hook.hook_storage import HookStorage
from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE, is_wrapped
from nncf.torch.quantization.layers import BaseQuantizer, BaseWeightsDecompressor

from ._weights import assemble_weights, check_buffers, load_effective_weights

__all__ = [
    "quantize_int8",
    "effective_weights",
    "disable_activation_quantizers",
    "weight_quantizer_map",
    "load_effective_weights",
    "HookSafeSequential",
]

_SOURCE = "pathsaliency.integrations.nncf"

# Modules NNCF inserts as hooks that only (fake-)quantize their input.
_WEIGHT_HOOK_TYPES: Tuple[type, ...] = (
    BaseQuantizer,
    BaseWeightsDecompressor,
    torch.ao.quantization.FakeQuantizeBase,  # after nncf.strip(..., StripFormat.NATIVE)
)
_ACTIVATION_QUANTIZER_TYPES: Tuple[type, ...] = (BaseQuantizer, torch.ao.quantization.FakeQuantizeBase)


class HookSafeSequential(nn.Sequential):
    """``nn.Sequential`` that skips NNCF's ``HookStorage`` child when iterating.

    NNCF registers its hook storage as a submodule of the model it wraps; a
    plain ``nn.Sequential`` would then call it as a layer and fail
    (``HookStorage`` has no ``forward``).  ``quantize_int8`` swaps the class of
    the *copy* it quantizes to this one; parameter names are unchanged.
    """

    def forward(self, input):  # noqa: A002 - same signature as nn.Sequential
        for module in self:
            if isinstance(module, HookStorage):
                continue
            input = module(input)
        return input


def _model_input(item: Any) -> Any:
    """Default ``transform_fn``: ``(x, y)`` / ``[x, y]`` -> ``x``; anything else as is."""
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def quantize_int8(
    model: nn.Module,
    calibration_data: Iterable[Any],
    subset_size: int = 300,
    transform_fn: Optional[Callable[[Any], Any]] = None,
    **nncf_kwargs: Any,
) -> nn.Module:
    """Post-training INT8 quantization of a deep copy of ``model`` with ``nncf.quantize``.

    Args:
        model: float torch model; never modified (a deep copy in eval mode is
            quantized).  A top-level plain ``nn.Sequential`` is quantized as a
            ``HookSafeSequential`` (same parameters), see that class.
        calibration_data: any iterable NNCF can iterate more than once, e.g.
            a list of input tensors, a list of ``(x, y)`` pairs or a
            ``torch.utils.data.DataLoader`` yielding ``(x, y)`` batches.
            With the default ``transform_fn`` a tuple/list item contributes its
            first element as the model input; any other item is the input.
        subset_size: number of calibration samples NNCF uses (``nncf.quantize``'s
            ``subset_size``; batches count as ``batch_size`` samples).
        transform_fn: maps one item of ``calibration_data`` to the model input
            (a tensor, a tuple of positional inputs or a dict of keyword inputs).
        **nncf_kwargs: forwarded to ``nncf.quantize`` (``preset``,
            ``fast_bias_correction``, ``ignored_scope``, ``target_device``,
            ``advanced_parameters``, ...).

    Returns:
        The NNCF-quantized copy (weights and activations fake-quantized).
        Its weights are certified through ``effective_weights``; its activation
        quantization is not (see the module docstring).
    """
    work = copy.deepcopy(model).eval()
    if type(work) is nn.Sequential:
        work.__class__ = HookSafeSequential
    dataset = nncf.Dataset(calibration_data, transform_fn or _model_input)
    return nncf.quantize(work, dataset, subset_size=subset_size, **nncf_kwargs)


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


def _split_key(key: str) -> Tuple[str, int]:
    op_name, port = key.rsplit("__", 1)
    return op_name.replace(":", "."), int(port)


def _is_weight_hook(module: nn.Module) -> bool:
    return isinstance(module, _WEIGHT_HOOK_TYPES)


def _param_at_port_heuristic(model: nn.Module, op_name: str, port: int) -> Optional[str]:
    """Name of the parameter feeding ``port`` of ``op_name``, from names only (no tracing).

    Exact for the standard torch modules of ``_STANDARD_WEIGHT_OPS`` (their
    ``forward`` passes ``self.weight``/``self.bias`` positionally); returns
    ``None`` for ports NNCF does not regard as weight ports; raises when a
    weight port cannot be resolved without tracing.
    """
    import nncf.torch.graph.operator_metatypes as om

    parts = op_name.split("/")
    if len(parts) < 2:
        return None  # a model input / output name
    fn_name = parts[-2]
    module_name = ".".join(parts[:-2])
    metatype = om.PT_OPERATOR_METATYPES.get_operator_metatype_by_op_name(fn_name)
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
    from nncf.common.graph.layer_attributes import ConstantLayerAttributes
    from nncf.torch.model_graph_manager import find_const_node_in_constant_subgraph

    node = graph.get_node_by_name(op_name)
    for prev in graph.get_previous_nodes(node):
        for edge in graph.get_edges(prev, node):
            if edge.input_port_id != port:
                continue
            const = find_const_node_in_constant_subgraph(prev, graph)
            if const is None:
                return None
            if not isinstance(const.layer_attributes, ConstantLayerAttributes):
                raise ValueError(f"{_SOURCE}: unexpected constant node {const.node_name!r}")
            name = const.layer_attributes.name
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
    from nncf.torch.model_graph_manager import AVAILABLE_NODE_TYPES_FOR_WEIGHT_SUBGRAPH

    while node is not const:
        if node.node_type not in AVAILABLE_NODE_TYPES_FOR_WEIGHT_SUBGRAPH:
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


def _hook_storage(model: nn.Module) -> HookStorage:
    storage = getattr(model, ATR_HOOK_STORAGE, None)
    if not is_wrapped(model) or not isinstance(storage, HookStorage):
        raise ValueError(
            f"{_SOURCE}: the model carries no NNCF hooks; pass the model returned by "
            "nncf.quantize / quantize_int8"
        )
    return storage


def _classify_hooks(
    model: nn.Module, example_input: Any = None
) -> Tuple[Dict[str, _WeightHooks], List[Tuple[str, nn.Module]]]:
    """Split NNCF's hooks into per-parameter weight hooks and the remaining (activation) hooks."""
    storage = _hook_storage(model)
    prefix = ATR_HOOK_STORAGE + "."
    const_names = {
        name
        for name, _ in chain(model.named_parameters(remove_duplicate=False), model.named_buffers())
        if not name.startswith(prefix)
    }
    graph = None
    if example_input is not None:
        from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

        with torch.no_grad():
            graph = build_nncf_graph(model, example_input)

    weights: Dict[str, _WeightHooks] = defaultdict(_WeightHooks)
    others: List[Tuple[str, nn.Module]] = []
    for kind in ("post_hooks", "pre_hooks"):
        for key, hooks in getattr(storage, kind).items():
            op_name, port = _split_key(key)
            named = [(f"{kind}.{key}.{i}", h) for i, h in hooks.items()]
            if kind == "post_hooks":
                param = op_name if op_name in const_names else None
            elif graph is not None:
                param = _param_at_port_traced(graph, op_name, port, const_names)
            else:
                param = _param_at_port_heuristic(model, op_name, port)
            if param is None:
                others.extend(named)
            elif kind == "post_hooks":
                weights[param].const_hooks.extend(named)
            else:
                weights[param].port_hooks[(op_name, port)] = named
    return dict(weights), others


def weight_quantizer_map(quantized_model: nn.Module, example_input: Any = None) -> Dict[str, List[str]]:
    """``{parameter name: [hook names applied to it, in order]}`` for the NNCF hooks on weights.

    Without ``example_input`` the weight behind a pre-hook is found from NNCF's
    op names (exact for standard ``nn.Conv*d``/``nn.ConvTranspose*d``/
    ``nn.Linear``/``nn.Embedding`` modules, otherwise an error asks for an
    input); with it, NNCF's traced graph is used.
    """
    weights, _ = _classify_hooks(quantized_model, example_input)
    out = {}
    for name, wh in weights.items():
        out[name] = [n for n, _ in wh.const_hooks] + [n for hooks in wh.port_hooks.values() for n, _ in hooks]
    return out


def _apply(hooks: List[Tuple[str, nn.Module]], value: torch.Tensor, param_name: str) -> torch.Tensor:
    for hook_name, hook in hooks:
        if not _is_weight_hook(hook):
            raise ValueError(
                f"{_SOURCE}: hook {hook_name!r} ({type(hook).__name__}) on {param_name!r} is not a "
                "quantizer; this adapter only reads back quantized weights"
            )
        value = hook(value)
    return value


@torch.no_grad()
def effective_weights(
    quantized_model: nn.Module, reference: nn.Module, example_input: Any = None
) -> Dict[str, torch.Tensor]:
    """Weights the NNCF-quantized model computes with, keyed by ``reference``'s parameter names.

    For every parameter of ``reference`` the value is the quantized model's
    parameter of that name passed through the hooks NNCF attached to it, in the
    order the model applies them (post-hooks on the parameter, then the weight
    quantizer pre-hook of the op consuming it): the weight quantizer module
    itself computes ``dequantize(quantize(w))``.  Parameters without hooks are
    copied from the quantized model (so biases changed by fast bias correction
    are included).  All values are float32 and detached.

    Args:
        quantized_model: result of ``nncf.quantize`` / ``quantize_int8`` (possibly
            after ``nncf.strip``); not modified.
        reference: the float model that was quantized (same parameter names);
            not modified.  The certificate uses its buffers (batch-norm running
            statistics); this function checks the quantized model did not change
            them.
        example_input: optional model input; when given, NNCF traces the model to
            locate the weight of each quantizer exactly, otherwise op names are
            used (exact for standard torch conv/linear/embedding modules, an
            error otherwise).

    Only weights are certified; activation quantization is not.  Raises if the
    model carries NNCF hooks other than quantizers (e.g. SmoothQuant scaling,
    pruning masks), since the float architecture could not reproduce it.
    """
    weights, others = _classify_hooks(quantized_model, example_input)
    for hook_name, hook in others:
        if not isinstance(hook, _ACTIVATION_QUANTIZER_TYPES):
            raise ValueError(
                f"{_SOURCE}: hook {hook_name!r} ({type(hook).__name__}) is not a quantizer; "
                "the float architecture with effective weights would not reproduce the model"
            )
    params = dict(quantized_model.named_parameters(remove_duplicate=False))
    buffers = dict(quantized_model.named_buffers())
    values: Dict[str, torch.Tensor] = {}
    for name, _ in reference.named_parameters():
        if name not in params and name not in buffers:
            continue  # reported by assemble_weights
        value = params[name] if name in params else buffers[name]
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
        values[name] = value
    unknown = set(weights) - set(values)
    if unknown:
        raise ValueError(f"{_SOURCE}: quantized tensors {sorted(unknown)} are not parameters of the reference")
    prefix = ATR_HOOK_STORAGE + "."
    check_buffers(
        reference, ((n, b) for n, b in buffers.items() if not n.startswith(prefix)), source=_SOURCE
    )
    return assemble_weights(reference, values, source=_SOURCE)


def disable_activation_quantizers(quantized_model: nn.Module, example_input: Any = None) -> nn.Module:
    """Deep copy of ``quantized_model`` with every activation (non-weight) quantizer disabled.

    The copy computes the float architecture with the effective (fake-quantized)
    weights -- the network ``effective_weights`` describes.  ``example_input`` is
    used as in ``effective_weights``.
    """
    model = copy.deepcopy(quantized_model)
    _, others = _classify_hooks(model, example_input)
    for _, hook in others:
        if isinstance(hook, BaseQuantizer):
            hook.disable_quantization()
        elif isinstance(hook, torch.ao.quantization.FakeQuantizeBase):
            hook.disable_fake_quant()
    return model
