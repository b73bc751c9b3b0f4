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

The section "Pruning" at the end of this module drives NNCF's unstructured pruning
(``nncf.prune``, ``UnstructuredPruningMask``, its schedulers) with path-magnitude scores: ``prune``,
``update_pruning_ratio``, ``PathMagnitudeMultiStepScheduler``, ``PathMagnitudeExponentialScheduler``.
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
    for name, _ in reference.named_parameters(remove_duplicate=False):
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


# ----------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------
#
# Path-magnitude pruning through NNCF's own unstructured-pruning machinery
# (``nncf/torch/function_hook/pruning``).  ``nncf.prune`` wraps the model, finds the prunable
# constants (``get_prunable_parameters``: the weight of every conv/linear/embedding/matmul op,
# minus ``ignored_scope``) and registers an ``UnstructuredPruningMask`` as a post-hook on each
# constant (hook key = the constant's name, e.g. ``layer1.0.conv1.weight``; its boolean buffer
# ``binary_mask`` multiplies the weight in every forward).  NNCF then fills the masks with
# ``magnitude/algo.py::update_pruning_ratio`` (|w|, or |w| / ||W||_2 for the global mode).
#
# Here the masks are filled from path-magnitude scores instead (``pathsaliency.path_magnitude``:
# the fraction of the path-norm lost by removing each weight alone, one unit across layers and
# invariant under neuron rescaling) with ``pathsaliency.pruning.masks_from_scores``.  Everything
# else is NNCF's: ``nncf.pruning_statistic`` reads the same ``binary_mask`` buffers,
# ``nncf.batch_norm_adaptation`` runs the masked forward, ``nncf.strip(model,
# strip_format=nncf.StripFormat.IN_PLACE)`` multiplies the weights by the masks and removes the
# hooks (NNCF's default ``StripFormat.NATIVE`` only converts quantizers and leaves pruning masks as
# hooks).  ``update_pruning_ratio`` and the two schedulers recompute the masks with path-magnitude
# scores of the *current* network (weights times current masks, batch-norm statistics as they are
# now), like NNCF's magnitude update recomputes them from the current weights.

import weakref

from nncf.parameters import PruneMode
from nncf.torch.function_hook.pruning.magnitude.algo import get_pruned_modules
from nncf.torch.function_hook.pruning.magnitude.modules import UnstructuredPruningMask
from nncf.torch.function_hook.pruning.magnitude.schedulers import (
    ExponentialMagnitudePruningScheduler,
    MultiStepMagnitudePruningScheduler,
)

import pathsaliency
from pathsaliency.lifting import sample_shape
from pathsaliency.pruning import masks_from_scores

__all__ += [
    "prune",
    "update_pruning_ratio",
    "pruning_masks",
    "PathMagnitudeMultiStepScheduler",
    "PathMagnitudeExponentialScheduler",
]

_SCOPE_TO_MODE = {
    "global": PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL,
    "local": PruneMode.UNSTRUCTURED_MAGNITUDE_LOCAL,
}
_MODE_TO_SCOPE = {mode: scope for scope, mode in _SCOPE_TO_MODE.items()}


@dataclass
class _PruneState:
    """What ``update_pruning_ratio`` needs to score a pruned model again.

    ``shadow`` is a copy of the architecture (the user's model as given to ``prune``, or NNCF's strip
    of a model pruned elsewhere) that receives the current effective weights before each scoring:
    path-magnitude traces it once (its structure never changes), and it never aliases the pruned
    model's tensors.
    """

    shadow: nn.Module
    input_shape: Tuple[int, ...]
    scope: str
    output: Any = None
    dtype: torch.dtype = torch.float32


# Pruned model -> its _PruneState.  Weak keys: the entry goes with the model.  (A deep copy of a
# pruned model is not registered: pass ``input_shape`` to ``update_pruning_ratio`` for it.)
_PRUNED: "weakref.WeakKeyDictionary[nn.Module, _PruneState]" = weakref.WeakKeyDictionary()


def _check_scope(scope: str) -> str:
    if scope not in _SCOPE_TO_MODE:
        raise ValueError(f"{_SOURCE}: scope must be 'global' or 'local', got {scope!r}")
    return scope


def _scope_of_mode(mode: Any) -> str:
    try:
        return _MODE_TO_SCOPE[PruneMode(mode)]
    except (ValueError, KeyError):
        raise ValueError(
            f"{_SOURCE}: path-magnitude pruning supports the modes {sorted(m.value for m in _MODE_TO_SCOPE)} "
            f"(global or per-tensor ranking), got {mode!r}"
        ) from None


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{_SOURCE}: the pruning ratio must be in [0, 1], got {ratio}")
    return ratio


def _own_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers by name (tied ones under every name), without NNCF's hook storage."""
    prefix = ATR_HOOK_STORAGE + "."
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return {n: t for n, t in out.items() if not n.startswith(prefix)}


def _mask_hooks(model: nn.Module) -> Dict[str, UnstructuredPruningMask]:
    """``{constant name: UnstructuredPruningMask}`` of an NNCF-pruned model (NNCF's ``get_pruned_modules``)."""
    if not is_wrapped(model):
        raise ValueError(
            f"{_SOURCE}: the model carries no NNCF hooks; pass the model returned by prune / nncf.prune"
        )
    hooks = get_pruned_modules(model)
    if not hooks:
        raise ValueError(
            f"{_SOURCE}: the model has no UnstructuredPruningMask hooks (was it pruned with nncf.prune in an "
            "unstructured magnitude mode, or with prune()?)"
        )
    return hooks


def pruning_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The current keep-masks of an NNCF-pruned model: ``{parameter name: bool tensor}`` (copies).

    ``True`` keeps the weight; these are the ``binary_mask`` buffers of NNCF's
    ``UnstructuredPruningMask`` hooks, keyed by NNCF's constant names (the parameter names).
    """
    return {name: hook.binary_mask.detach().clone().bool() for name, hook in _mask_hooks(model).items()}


def _state_for(
    model: nn.Module,
    input_shape: Any = None,
    scope: Optional[str] = None,
    output: Any = None,
    dtype: Optional[torch.dtype] = None,
) -> _PruneState:
    """The remembered state of ``model``, updated with the arguments that are given."""
    state = _PRUNED.get(model)
    if state is None:
        if input_shape is None:
            raise ValueError(
                f"{_SOURCE}: this model was not pruned by pathsaliency's prune() (or is a copy of one): "
                "pass input_shape (the shape of one input sample, e.g. (3, 32, 32))"
            )
        # a plain copy of the architecture: NNCF's own strip (weights times masks, hooks removed)
        shadow = nncf.strip(model, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)
        state = _PruneState(shadow, sample_shape(input_shape), _check_scope(scope or "global"))
        _PRUNED[model] = state
    if input_shape is not None:
        state.input_shape = sample_shape(input_shape)
    if scope is not None:
        state.scope = _check_scope(scope)
    if output is not None:
        state.output = output
    if dtype is not None:
        state.dtype = dtype
    return state


@torch.no_grad()
def _load_shadow(shadow: nn.Module, model: nn.Module, masks: Optional[Dict[str, torch.Tensor]]) -> None:
    """Copy ``model``'s parameters and buffers into ``shadow``, multiplied by ``masks`` where given."""
    source = _own_tensors(model)
    for name, tensor in _own_tensors(shadow).items():
        value = source.get(name)
        if value is None:
            raise ValueError(f"{_SOURCE}: the pruned model has no tensor {name!r}; was its architecture changed?")
        value = value.detach()
        mask = None if masks is None else masks.get(name)
        if mask is not None:
            value = value * mask.to(device=value.device, dtype=value.dtype)
        tensor.copy_(value)


def _score_keys(state: _PruneState, scores: Dict[str, torch.Tensor], names: Iterable[str]) -> Dict[str, str]:
    """``{NNCF constant name: path_magnitude key}``: the same tensor, matched by name (or by identity
    for a parameter tied under several names).  Raises for a constant that path-magnitude does not score."""
    tensors = _own_tensors(state.shadow)
    by_id = {id(tensors[k]): k for k in scores if k in tensors}
    out, not_param, not_scored = {}, [], []
    for name in names:
        tensor = tensors.get(name)
        if tensor is None:
            not_param.append(name)
        elif name in scores:
            out[name] = name
        elif id(tensor) in by_id:
            out[name] = by_id[id(tensor)]
        else:
            not_scored.append(name)
    if not_param:
        raise ValueError(
            f"{_SOURCE}: NNCF prunes the constants {sorted(not_param)}, which are not parameters or buffers "
            "of the model"
        )
    if not_scored:
        raise ValueError(
            f"{_SOURCE}: NNCF prunes {sorted(not_scored)}, which path-magnitude does not score (it scores the "
            f"weights of conv/linear layers that reach the output: {sorted(scores)}); leave them out with "
            f"ignored_scope=nncf.IgnoredScope(names={sorted(not_scored)!r})"
        )
    return out


def _count(ratio: float, numel: int) -> int:
    return int(round(ratio * numel))  # as pathsaliency.pruning.masks_from_scores


def _path_magnitude(state: _PruneState) -> Dict[str, torch.Tensor]:
    # enable_grad: path_magnitude differentiates the path-norm, and a scheduler may well be stepped
    # inside a ``torch.no_grad()`` block
    with torch.enable_grad():
        return pathsaliency.path_magnitude(state.shadow, state.input_shape, output=state.output, dtype=state.dtype)


@torch.no_grad()
def update_pruning_ratio(
    model: nn.Module,
    ratio: float,
    input_shape: Any = None,
    scope: Optional[str] = None,
    *,
    output: Any = None,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """Recompute the ``UnstructuredPruningMask`` masks of ``model`` for ``ratio``, by path-magnitude.

    The path-magnitude counterpart of NNCF's ``update_pruning_ratio(model, mode, ratio)``
    (``nncf/torch/function_hook/pruning/magnitude/algo.py``).  The scores are those of the
    *current* effective network -- the model's parameters times the current masks, with its
    current buffers (batch-norm statistics after ``nncf.batch_norm_adaptation``), i.e. the network
    ``nncf.strip(model, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)`` gives -- and the
    new keep-masks are ``masks_from_scores(scores, ratio, scope)`` over the pruned tensors (the
    ``round(ratio * n)`` lowest scores removed, globally or per tensor), with one tie rule:
    weights masked now carry nothing in the current network (score 0) and are ranked below every
    unmasked weight, so raising the ratio only adds weights to the pruned set (nested masks).  When
    the ratio goes down, the masked weights brought back are those with the largest path-magnitude
    in the network without masks.  Masked weights keep their stored values (NNCF's masks only
    multiply them), so a weight brought back returns with its value.

    ``input_shape`` (one sample, e.g. ``(3, 32, 32)``), ``scope`` (``"global"`` or ``"local"``),
    ``output`` and ``dtype`` (forwarded to ``pathsaliency.path_magnitude``) default to what
    ``prune`` remembered for this model; given ones replace them for later updates.  A model pruned
    by ``nncf.prune`` directly (or a copy of a pruned model) needs ``input_shape`` (scope default
    ``"global"``).  Hooks other than pruning masks (e.g. quantizers) are not applied when scoring.

    Returns the new masks, ``{parameter name: bool tensor}`` (copies).
    """
    ratio = _check_ratio(ratio)
    hooks = _mask_hooks(model)
    state = _state_for(model, input_shape, scope, output, dtype)
    current = {name: hook.binary_mask.detach().bool() for name, hook in hooks.items()}

    _load_shadow(state.shadow, model, current)
    scores = _path_magnitude(state)
    keys = _score_keys(state, scores, hooks)
    # the order of path_magnitude's keys: the ranking (and its ties) are those of masks_from_scores
    order = {key: i for i, key in enumerate(scores)}
    names = sorted(hooks, key=lambda n: (order[keys[n]], n))

    masked = {n: int((~current[n]).sum()) for n in names}
    if state.scope == "global":
        total = sum(current[n].numel() for n in names)
        revive = _count(ratio, total) < sum(masked.values())
    else:
        revive = any(_count(ratio, current[n].numel()) < masked[n] for n in names)
    dense = None
    if revive:  # the ratio went down: rank the masked weights by their score without masks
        _load_shadow(state.shadow, model, None)
        dense = _path_magnitude(state)

    def relative(s: Dict[str, torch.Tensor], n: str) -> torch.Tensor:
        # path_magnitude divides by ||Phi||_1: 0/0 = nan when the current network carries no path at
        # all (e.g. a whole layer masked); removing any weight then loses nothing: score 0
        return torch.nan_to_num(s[keys[n]].detach().to(torch.float64), nan=0.0)

    ranking = {}
    for n in names:
        score = relative(scores, n)
        below = -2.0 + relative(dense, n) if dense is not None else torch.full_like(score, -1.0)
        # relative scores lie in [0, 1]: masked weights rank below every unmasked one
        ranking[n] = torch.where(current[n].to(score.device), score, below.to(score.device))
    new = masks_from_scores(ranking, ratio, state.scope)
    for n in names:
        hooks[n].binary_mask.copy_(new[n].to(hooks[n].binary_mask.device))
    return {n: hooks[n].binary_mask.detach().clone() for n in names}


def prune(
    model: nn.Module,
    ratio: float,
    input_shape: Any,
    *,
    scope: str = "global",
    examples_inputs: Any = None,
    ignored_scope: Optional["nncf.IgnoredScope"] = None,
    output: Any = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Unstructured path-magnitude pruning of a deep copy of ``model`` through ``nncf.prune``.

    NNCF wraps the copy and attaches an ``UnstructuredPruningMask`` to each prunable weight
    (``nncf.prune`` in the ``UNSTRUCTURED_MAGNITUDE_GLOBAL`` / ``_LOCAL`` mode matching ``scope``,
    with ``ignored_scope`` and ``examples_inputs``); the masks are then set to
    ``masks_from_scores(path_magnitude(model, input_shape), ratio, scope)`` restricted to the weights
    NNCF prunes: the ``round(ratio * n)`` weights that carry the least path-norm are masked, over
    all pruned weights together (``"global"``: path-magnitude scores share one unit across layers,
    no per-layer normalisation) or per tensor (``"local"``).

    Args:
        model: float model; never modified.  Every weight NNCF prunes must be a conv/linear weight
            that ``pathsaliency.path_magnitude`` scores (an error names the others; leave them out
            with ``ignored_scope``, whose ``names`` may be parameter names such as ``"conv1.weight"``).
            A top-level plain ``nn.Sequential`` becomes a ``HookSafeSequential``.
        ratio: fraction of the pruned weights to mask, in [0, 1].
        input_shape: the shape of one input sample, e.g. ``(3, 32, 32)``.
        scope: ``"global"`` or ``"local"``.
        examples_inputs: model input NNCF traces; default ``torch.zeros(1, *input_shape)``.
        ignored_scope: ``nncf.IgnoredScope`` of weights (or ops) not to prune.
        output, dtype: forwarded to ``pathsaliency.path_magnitude``.

    Returns:
        The NNCF-pruned copy: ``nncf.pruning_statistic``, ``nncf.batch_norm_adaptation`` and
        ``nncf.strip(..., strip_format=nncf.StripFormat.IN_PLACE)`` work on it as on any NNCF-pruned
        model.  ``input_shape``, ``scope``, ``output`` and ``dtype`` are remembered for
        ``update_pruning_ratio`` and the path-magnitude schedulers.
    """
    ratio = _check_ratio(ratio)
    mode = _SCOPE_TO_MODE[_check_scope(scope)]
    shape = sample_shape(input_shape)
    shadow = copy.deepcopy(model)
    work = copy.deepcopy(model)
    if type(work) is nn.Sequential:
        work.__class__ = HookSafeSequential
    if examples_inputs is None:
        first = next(chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype_in = first.dtype if first is not None and first.is_floating_point() else torch.float32
        examples_inputs = torch.zeros((1,) + shape, device=device, dtype=dtype_in)
    pruned = nncf.prune(work, mode, ratio=ratio, ignored_scope=ignored_scope, examples_inputs=examples_inputs)
    with torch.no_grad():  # drop NNCF's magnitude masks: score the dense network
        for hook in get_pruned_modules(pruned).values():
            hook.binary_mask.fill_(True)
    _PRUNED[pruned] = _PruneState(shadow, shape, scope, output, dtype)
    update_pruning_ratio(pruned, ratio)
    return pruned


class _PathMagnitudeStep:
    """``step`` of NNCF's ``_BaseMagnitudePruningScheduler`` with the mask update by path-magnitude.

    Identical to NNCF's (``nncf/torch/function_hook/pruning/magnitude/schedulers.py``) except that it
    calls this module's ``update_pruning_ratio`` instead of the magnitude one.
    """

    def step(self, epoch: Optional[int] = None) -> None:
        if epoch is None:
            epoch = self.epoch
        else:
            self.epoch = epoch
        self.current_ratio = self.get_pruning_ratio(epoch)
        model = self.ref_model()
        if model is None:
            raise nncf.InternalError("The referenced model is no longer available")
        update_pruning_ratio(model, self.current_ratio, scope=_MODE_TO_SCOPE[self.mode])
        self.epoch += 1


def _scheduler_mode(model: nn.Module, mode: Any) -> PruneMode:
    if mode is not None:
        return _SCOPE_TO_MODE[_scope_of_mode(mode)]
    state = _PRUNED.get(model)
    return _SCOPE_TO_MODE[state.scope if state is not None else "global"]


class PathMagnitudeMultiStepScheduler(_PathMagnitudeStep, MultiStepMagnitudePruningScheduler):
    """NNCF's ``MultiStepMagnitudePruningScheduler`` whose ``step()`` recomputes the masks by path-magnitude.

    ``steps`` maps epochs to ratios (must contain 0), as in NNCF.  ``mode`` (an unstructured
    magnitude ``nncf.PruneMode``, global or local) defaults to the scope ``prune`` was called with.
    A model not pruned by ``prune`` needs ``update_pruning_ratio(model, r, input_shape)`` once first.
    """

    def __init__(self, model: nn.Module, *, steps: Dict[int, float], mode: Optional[PruneMode] = None) -> None:
        super().__init__(model, mode=_scheduler_mode(model, mode), steps=steps)


class PathMagnitudeExponentialScheduler(_PathMagnitudeStep, ExponentialMagnitudePruningScheduler):
    """NNCF's ``ExponentialMagnitudePruningScheduler`` whose ``step()`` recomputes the masks by path-magnitude.

    ``ratio(epoch) = 1 - (1 - initial_ratio) * ((1 - target_ratio) / (1 - initial_ratio)) ** (epoch / target_epoch)``
    (NNCF's ``exponential_ratio_scheduler``).  ``mode`` as for ``PathMagnitudeMultiStepScheduler``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        initial_ratio: float,
        target_ratio: float,
        target_epoch: int,
        mode: Optional[PruneMode] = None,
    ) -> None:
        super().__init__(
            model,
            mode=_scheduler_mode(model, mode),
            initial_ratio=initial_ratio,
            target_ratio=target_ratio,
            target_epoch=target_epoch,
        )
