"""Intel Neural Compressor 3.x (PyTorch) quantization, read back as effective float weights.

``pathsaliency`` certifies ``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D(theta, theta')``
for a ReLU network whose *weights* change from ``theta`` to ``theta'``.  For an
INC-quantized model, ``theta'`` is the float architecture loaded with the
weights the quantized model really computes with (``effective_weights``).

What is certified: weight quantization.  What is NOT certified: activation
quantization (static INT8 also quantizes activations; its input-dependent
rounding error is outside the path-metric bound).  Weight-only RTN has no
activation quantization, so there the certificate covers the whole model.

How INC 3.10 represents the quantized weights:

* Static INT8, PT2E flow (``neural_compressor/torch/export/pt2e_export.py``,
  ``neural_compressor/torch/algorithms/pt2e_quant/core.py``, which calls
  ``torchao.quantization.pt2e.prepare_pt2e/convert_pt2e`` with an
  ``X86InductorQuantizer`` on torch >= 2.11): the result is a
  ``torch.fx.GraphModule`` (from ``torch.export``) whose parameters keep the
  original names.  Each weight reaches its conv/linear through
  ``get_attr(w) -> quantized_decomposed.quantize_per_channel(w, _scale_k,
  _zero_point_k, axis, -128, 127, int8) -> dequantize_per_channel(...)`` with
  the per-channel scale/zero point stored as buffers ``_scale_k`` /
  ``_zero_point_k``; activations go through ``quantize_per_tensor ->
  dequantize_per_tensor`` pairs with literal scale/zero point.  Batch norms
  that follow a conv (or a linear with 2-D input) are folded into it before
  quantization (``torchao.quantization.pt2e.utils.fold_bn_weights_into_conv_node``):
  the conv weight parameter then holds ``w * s`` with
  ``s = gamma / sqrt(running_var + eps)`` per output channel, its bias holds
  the folded bias (a new ``<weight>_bias`` parameter when the conv had none),
  and the batch norm disappears from the graph.  ``effective_weights`` evaluates
  the weight's constant q/dq subgraph with the graph's own ops and scales, and
  maps folded weights back onto the original conv + batch-norm parameters
  (``w' = dequantize(quantize(w * s)) / s``, batch norm unchanged), which
  computes the same function.
* Weight-only RTN (``neural_compressor/torch/algorithms/weight_only/rtn.py``,
  ``.../weight_only/modules.py``): every quantized ``nn.Linear`` (RTN's white
  list is ``nn.Linear`` and ``transformers.Conv1D`` only -- convolutions are
  left in float) is replaced by an ``INCWeightOnlyLinear`` holding packed int32
  ``qweight``, ``scales`` and ``qzeros`` (fp16 in the default
  ``use_optimum_format``) and an fp16 ``bias``; its forward computes with
  ``recover()`` (the dequantized weight, fp16) cast to float32.
  ``effective_weights`` uses ``recover()`` and the stored bias, i.e. exactly
  what the forward uses (including the fp16 rounding of the bias).

The last section gives INC's ``autotune`` a data-free objective: ``certified_eval_fn`` scores a
candidate by ``1 - D / ||Phi(theta)||_1`` (the float baseline scores 1, so ``tolerable_loss`` is the
largest certified relative distance accepted), and ``autotune_certified`` runs the whole search.
"""
from __future__ import annotations

try:
    import neural_compressor.torch  # noqa: F401
    from neural_compressor.torch.quantization import RTNConfig, StaticQuantConfig, convert, prepare
except ImportError as e:  # pragma: no cover - exercised only without INC
    raise ImportError(
        "pathsaliency.integrations.neural_compressor needs Intel Neural Compressor: "
        "pip install 'pathsaliency[inc]'"
    ) from e

import copy
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import fx, nn

from ._weights import assemble_weights, check_buffers, load_effective_weights

__all__ = [
    "quantize_static_int8",
    "quantize_weight_only",
    "effective_weights",
    "disable_activation_quantizers",
    "load_effective_weights",
]

_SOURCE = "pathsaliency.integrations.neural_compressor"


def _as_tuple(example_inputs: Any) -> Tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _model_input(item: Any) -> Any:
    """Default ``transform_fn``: ``(x, y)`` / ``[x, y]`` -> ``x``; anything else as is."""
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


# ----------------------------------------------------------------------------------------------
# Quantization entry points
# ----------------------------------------------------------------------------------------------


def quantize_static_int8(
    model: nn.Module,
    example_inputs: Any,
    calibration_data: Iterable[Any],
    transform_fn: Optional[Callable[[Any], Any]] = None,
    dynamic_shapes: Any = None,
    **config_kwargs: Any,
) -> fx.GraphModule:
    """Static W8A8 quantization of a deep copy of ``model`` with INC's PT2E flow.

    ``neural_compressor.torch.export.export`` (``torch.export``) ->
    ``prepare(exported, StaticQuantConfig(**config_kwargs))`` -> calibration
    forward passes -> ``convert``.  Default config: per-channel symmetric int8
    weights, per-tensor asymmetric uint8 activations, min/max observers.

    Args:
        model: float model; never modified.
        example_inputs: a tensor or tuple of positional inputs used to export.
        calibration_data: iterable of model inputs, or of ``(x, y)`` pairs (a
            ``DataLoader`` works).  Without ``dynamic_shapes`` the exported graph
            is specialised to the shapes of ``example_inputs``, so calibration
            inputs must have those shapes.
        transform_fn: maps one item of ``calibration_data`` to the model input
            (tensor, tuple of positional inputs or dict); default takes the first
            element of tuples/lists.
        dynamic_shapes: forwarded to ``torch.export``.
        **config_kwargs: forwarded to ``StaticQuantConfig``.

    Returns:
        The converted ``torch.fx.GraphModule`` (quantize/dequantize ops on weights
        and activations).  ``example_inputs`` is stored on it as attribute
        ``example_inputs`` (as INC does on prepared models), which
        ``effective_weights`` uses to undo batch-norm folding.
    """
    from neural_compressor.torch.export import export

    example_inputs = _as_tuple(example_inputs)
    work = copy.deepcopy(model).eval()
    exported = export(work, example_inputs, dynamic_shapes=dynamic_shapes)
    prepared = prepare(exported, StaticQuantConfig(**config_kwargs), example_inputs=example_inputs)
    transform = transform_fn or _model_input
    with torch.no_grad():
        for item in calibration_data:
            _call(prepared, transform(item))
    quantized = convert(prepared)
    quantized.example_inputs = example_inputs
    return quantized


def quantize_weight_only(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 32,
    example_inputs: Any = None,
    **rtn_kwargs: Any,
) -> nn.Module:
    """Weight-only round-to-nearest quantization (``RTNConfig``) of a deep copy of ``model``.

    RTN quantizes ``nn.Linear`` layers only (INC's white list; convolutions stay
    float); each becomes an ``INCWeightOnlyLinear``.  ``bits`` is 8 or 4
    (INC accepts 1..8); ``group_size=-1`` means one group per output channel,
    a group larger than the input width is clipped to it by INC.  Layer-wise
    loading is off (``use_layer_wise=False``) unless given in ``rtn_kwargs``;
    other ``rtn_kwargs`` go to ``RTNConfig`` (``use_sym``, ``dtype``, ...).
    ``example_inputs`` is not needed by RTN and only forwarded to ``prepare``.

    There are no activation quantizers, so the certificate on
    ``effective_weights`` covers the quantized model completely.
    """
    rtn_kwargs.setdefault("use_layer_wise", False)
    config = RTNConfig(bits=bits, group_size=group_size, **rtn_kwargs)
    work = copy.deepcopy(model).eval()
    kwargs = {} if example_inputs is None else {"example_inputs": _as_tuple(example_inputs)}
    prepared = prepare(work, config, **kwargs)
    return convert(prepared)


# ----------------------------------------------------------------------------------------------
# PT2E graphs
# ----------------------------------------------------------------------------------------------


def _qdq_kind(node: fx.Node) -> Optional[str]:
    """``"q"`` / ``"dq"`` for quantized_decomposed quantize/dequantize ops, else ``None``."""
    if node.op != "call_function":
        return None
    target = node.target
    if getattr(target, "namespace", None) != "quantized_decomposed":
        return None
    base = target.name().split("::")[-1]
    if base.startswith("quantize_"):
        return "q"
    if base.startswith("dequantize_"):
        return "dq"
    return None


def _is_pt2e_quantized(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and any(_qdq_kind(n) for n in model.graph.nodes)


class _Consts:
    """Decides which graph nodes are constants (depend only on get_attr) and evaluates them."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._is: Dict[fx.Node, bool] = {}
        self._val: Dict[fx.Node, Any] = {}

    def is_const(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return True
        if node not in self._is:
            if node.op == "get_attr":
                self._is[node] = True
            elif node.op == "call_function":
                inputs = node.all_input_nodes
                self._is[node] = bool(inputs) and all(self.is_const(n) for n in inputs)
            else:
                self._is[node] = False
        return self._is[node]

    def value(self, node: fx.Node) -> Any:
        if node not in self._val:
            if node.op == "get_attr":
                self._val[node] = _get_attr(self.gm, node.target)
            else:
                args = fx.node.map_arg(node.args, self.value)
                kwargs = fx.node.map_arg(node.kwargs, self.value)
                self._val[node] = node.target(*args, **kwargs)
        return self._val[node]


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _source_attr(node: fx.Node) -> Optional[fx.Node]:
    """Follow input 0 through q/dq ops back to the get_attr node of the stored float tensor."""
    while _qdq_kind(node) is not None:
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            return None
        node = arg
    return node if node.op == "get_attr" else None


def _pt2e_graph_values(gm: fx.GraphModule) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(values of quantized weights by source name, tensors used directly through get_attr by name)."""
    consts = _Consts(gm)
    quantized: Dict[str, torch.Tensor] = {}
    direct: Dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and any(_qdq_kind(u) is None for u in node.users):
                direct[node.target] = value
            continue
        if _qdq_kind(node) != "dq" or not consts.is_const(node):
            continue
        if all(_qdq_kind(u) is not None for u in node.users):
            continue  # only an intermediate of a longer q/dq chain
        src = _source_attr(node)
        if src is None:
            raise ValueError(
                f"{_SOURCE}: cannot trace the quantized constant {node.name!r} back to a stored float "
                "parameter (was the model converted with fold_quantize=True?)"
            )
        value = consts.value(node)
        previous = quantized.get(src.target)
        if previous is not None and not torch.equal(previous, value):
            raise ValueError(f"{_SOURCE}: {src.target!r} is quantized differently for different consumers")
        quantized[src.target] = value
    return quantized, direct


def _schema_args(node: fx.Node) -> Dict[str, Any]:
    schema = node.target._schema.arguments
    out = {}
    for i, arg in enumerate(schema):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        else:
            out[arg.name] = node.kwargs.get(arg.name, arg.default_value)
    return out


_BN_TARGETS = ("_native_batch_norm_legit_no_training", "batch_norm")
_CONV_TARGETS = ("conv1d", "conv2d", "conv3d")
_CONV_T_TARGETS = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def _aten_name(node: fx.Node) -> Optional[str]:
    if node.op != "call_function" or getattr(node.target, "namespace", None) != "aten":
        return None
    return node.target.name().split("::")[-1].split(".")[0]


def _bn_foldings(
    reference: nn.Module, example_inputs: Tuple[Any, ...], exported: Optional[fx.GraphModule] = None
) -> List[Dict[str, Any]]:
    """Every batch norm of the exported reference graph, with the conv/linear feeding it if any.

    ``kind`` is ``"conv"``, ``"conv_t"`` or ``"linear"`` when PT2E may have
    folded the batch norm into that producer (``weight``/``bias`` are then the
    producer's parameter names), ``None`` otherwise.  ``exported``: the reference
    already exported (unprepared) with these inputs, to skip exporting it again.
    """
    from neural_compressor.torch.export import export

    if exported is None:
        exported = export(copy.deepcopy(reference).eval(), _as_tuple(example_inputs))
    out = []
    for node in exported.graph.nodes:
        if _aten_name(node) not in _BN_TARGETS:
            continue
        bn = _schema_args(node)
        names = {}
        for key in ("weight", "bias", "running_mean", "running_var"):
            arg = bn.get(key)
            names[key] = arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
        fold: Dict[str, Any] = {"kind": None, "weight": None, "bias": None, "bn": names, "eps": float(bn["eps"])}
        out.append(fold)
        producer = node.args[0]
        kind = _aten_name(producer) if isinstance(producer, fx.Node) else None
        if kind not in _CONV_TARGETS + _CONV_T_TARGETS + ("linear",):
            continue
        w_arg = producer.args[1]
        b_arg = producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")
        if not (isinstance(w_arg, fx.Node) and w_arg.op == "get_attr"):
            continue
        if b_arg is not None and not (isinstance(b_arg, fx.Node) and b_arg.op == "get_attr"):
            continue
        fold["kind"] = "conv_t" if kind in _CONV_T_TARGETS else ("linear" if kind == "linear" else "conv")
        fold["weight"] = w_arg.target
        fold["bias"] = None if b_arg is None else b_arg.target
    return out

def _safe_div(num: torch.Tensor, den: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, ``fallback`` elsewhere (a batch norm with gamma = 0)."""
    alive = den != 0
    return torch.where(alive, num / torch.where(alive, den, torch.ones_like(den)), fallback)


def _unfold_bn(
    fold: Dict[str, Any],
    reference: nn.Module,
    values: Dict[str, torch.Tensor],
    direct: Dict[str, torch.Tensor],
) -> None:
    """Express a folded ``conv/linear + batch norm`` on the original parameters, in ``values``.

    PT2E stored ``w_f = w * s`` and ``b_f = b * s + b0`` with
    ``s = gamma / sqrt(var + eps)`` and ``b0 = beta - mean * s`` (per output
    channel), computed with ``torch.nn.utils.fusion``.  The original layer with
    weight ``q(w_f) / s`` and bias ``(b_f - b0) / s`` followed by the unchanged
    batch norm computes ``q(w_f) x + b_f``, i.e. the quantized layer.
    """
    ref_params = dict(reference.named_parameters())
    w_name, b_name, bn = fold["weight"], fold["bias"], fold["bn"]
    if w_name not in values:
        raise ValueError(f"{_SOURCE}: the batch norm after {w_name!r} was folded but the weight is not in the graph")

    def ref_tensor(name: Optional[str]) -> Optional[torch.Tensor]:
        return None if name is None else _get_attr(reference, name).detach()

    w_ref = ref_params[w_name].detach()
    stats = (ref_tensor(bn["running_mean"]), ref_tensor(bn["running_var"]), fold["eps"])
    affine = (ref_tensor(bn["weight"]), ref_tensor(bn["bias"]))
    ones = torch.ones_like(w_ref)
    # the fusion applied to an all-ones weight and no bias gives s (broadcast to w's shape) and b0
    if fold["kind"] == "linear":
        scale, bias0 = torch.nn.utils.fusion.fuse_linear_bn_weights(ones, None, *stats, *affine)
    else:
        scale, bias0 = torch.nn.utils.fusion.fuse_conv_bn_weights(
            ones, None, *stats, *affine, transpose=fold["kind"] == "conv_t"
        )
    scale, bias0 = scale.detach(), bias0.detach()
    values[w_name] = _safe_div(values[w_name].detach().to(w_ref), scale, w_ref)

    channel_dim = 1 if fold["kind"] == "conv_t" else 0
    s_channel = scale.transpose(0, channel_dim).flatten(1)[:, 0]
    folded_bias_name = b_name if b_name is not None else w_name + "_bias"
    folded_bias = direct.get(folded_bias_name)
    if folded_bias is None:
        raise ValueError(f"{_SOURCE}: folded bias {folded_bias_name!r} not found in the quantized graph")
    folded_bias = folded_bias.detach().to(bias0)
    if b_name is None:
        if not torch.allclose(folded_bias, bias0, rtol=1e-5, atol=1e-6):
            raise ValueError(f"{_SOURCE}: folded bias {folded_bias_name!r} does not match the reference batch norm")
    else:
        values[b_name] = _safe_div(folded_bias - bias0, s_channel, ref_params[b_name].detach())
    for key in ("weight", "bias"):
        if bn[key] is not None:
            values[bn[key]] = ref_params[bn[key]]


def _pt2e_effective_weights(
    gm: fx.GraphModule,
    reference: nn.Module,
    example_inputs: Any,
    foldings: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, torch.Tensor]:
    """``foldings``: ``_bn_foldings(reference, example_inputs)`` computed beforehand (it exports the
    reference), for callers that read many graphs against one reference."""
    quantized, direct = _pt2e_graph_values(gm)
    ref_params = dict(reference.named_parameters())
    ref_buffers = dict(reference.named_buffers())
    values: Dict[str, torch.Tensor] = {}
    for name, value in direct.items():
        if name in ref_params:
            values[name] = value
    for name, value in quantized.items():
        if name not in ref_params:
            raise ValueError(f"{_SOURCE}: quantized tensor {name!r} is not a parameter of the reference")
        values[name] = value
    check_buffers(reference, ((n, v) for n, v in direct.items() if n in ref_buffers), source=_SOURCE)

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in reference.modules())
    used = set(direct) | set(quantized)
    if has_bn:
        if foldings is None:
            if example_inputs is None:
                example_inputs = getattr(gm, "example_inputs", None)
            if example_inputs is None:
                raise ValueError(
                    f"{_SOURCE}: the reference has batch norms that PT2E may have folded; pass "
                    "`example_inputs` (the inputs used to export) to map folded weights back"
                )
            foldings = _bn_foldings(reference, _as_tuple(example_inputs))
        folded_weights = set()
        for fold in foldings:
            if any(n in used for n in fold["bn"].values() if n is not None):
                continue  # this batch norm is still in the quantized graph: nothing was folded
            if fold["kind"] is None:
                raise ValueError(
                    f"{_SOURCE}: batch norm {fold['bn']} is gone from the quantized graph but does not "
                    "follow a conv/linear; cannot map its effect back onto the reference"
                )
            if fold["weight"] in folded_weights:
                raise ValueError(f"{_SOURCE}: {fold['weight']!r} feeds several folded batch norms; unsupported")
            folded_weights.add(fold["weight"])
            _unfold_bn(fold, reference, values, direct)
    # parameters the graph does not use (unused layers) are unchanged
    for name, param in ref_params.items():
        values.setdefault(name, param)
    return assemble_weights(reference, values, source=_SOURCE)


def _without_activation_qdq(gm: fx.GraphModule) -> fx.GraphModule:
    out = copy.deepcopy(gm)
    consts = _Consts(out)
    for node in list(out.graph.nodes):
        if _qdq_kind(node) != "dq":
            continue
        q = node.args[0]
        if not isinstance(q, fx.Node) or _qdq_kind(q) != "q" or consts.is_const(q):
            continue
        node.replace_all_uses_with(q.args[0])
    out.graph.eliminate_dead_code()
    out.recompile()
    if hasattr(gm, "example_inputs"):  # GraphModule's deepcopy drops it
        out.example_inputs = gm.example_inputs
    return out


# ----------------------------------------------------------------------------------------------
# Weight-only modules
# ----------------------------------------------------------------------------------------------


def _woq_classes() -> Tuple[type, ...]:
    from neural_compressor.torch.algorithms.weight_only.modules import WeightOnlyLinear

    return (WeightOnlyLinear,)


def _woq_effective_weights(qm: nn.Module, reference: nn.Module) -> Dict[str, torch.Tensor]:
    ref_params = dict(reference.named_parameters())
    values: Dict[str, torch.Tensor] = {}
    for name, module in qm.named_modules():
        if not isinstance(module, _woq_classes()):
            continue
        if not hasattr(module, "recover"):
            raise ValueError(f"{_SOURCE}: {type(module).__name__} at {name!r} has no recover() method")
        prefix = f"{name}." if name else ""
        with torch.no_grad():
            values[prefix + "weight"] = module.recover().float()
        bias = getattr(module, "bias", None)
        if prefix + "bias" in ref_params:
            if bias is None:
                values[prefix + "bias"] = torch.zeros_like(ref_params[prefix + "bias"])
            else:
                values[prefix + "bias"] = bias.float()
        elif bias is not None and bool(torch.any(bias != 0)):
            raise ValueError(f"{_SOURCE}: {name!r} has a nonzero bias but the reference layer has none")
    for name, param in qm.named_parameters():
        values.setdefault(name, param)
    check_buffers(reference, qm.named_buffers(), source=_SOURCE)
    return assemble_weights(reference, values, source=_SOURCE)


# ----------------------------------------------------------------------------------------------
# Public read-back API
# ----------------------------------------------------------------------------------------------


def effective_weights(
    quantized_model: nn.Module, reference: nn.Module, example_inputs: Any = None
) -> Dict[str, torch.Tensor]:
    """Weights the INC-quantized model computes with, keyed by ``reference``'s parameter names.

    * PT2E static INT8 (``quantize_static_int8`` or INC's ``export``/``prepare``/
      ``convert``): each quantized weight is the value of its constant
      ``quantize -> dequantize`` subgraph, evaluated with the graph's own ops,
      scales and zero points; biases and other float parameters are read from
      the graph.  Batch norms folded into a conv/linear are undone (weight
      divided by the batch-norm scale, batch-norm parameters kept), which needs
      the export inputs: ``example_inputs`` or the ``example_inputs`` attribute
      ``quantize_static_int8`` leaves on the model.
    * Weight-only RTN: ``INCWeightOnlyLinear.recover()`` (INC's own unpack +
      dequantize) and the stored bias; other parameters are copied.

    Only the weights are certified; activation quantization (static INT8) is
    not -- see ``disable_activation_quantizers``.  Neither model is modified.
    Values are float32 and detached.
    """
    if _is_pt2e_quantized(quantized_model):
        return _pt2e_effective_weights(quantized_model, reference, example_inputs)
    if any(isinstance(m, _woq_classes()) for m in quantized_model.modules()):
        return _woq_effective_weights(quantized_model, reference)
    raise ValueError(f"{_SOURCE}: no INC quantization (PT2E q/dq ops or weight-only modules) found in the model")


def disable_activation_quantizers(quantized_model: nn.Module) -> nn.Module:
    """Copy of ``quantized_model`` computing without activation quantization.

    For a PT2E graph, every ``quantize -> dequantize`` pair on a non-constant
    tensor is removed (weight q/dq pairs are kept).  Weight-only models have no
    activation quantizers; a plain deep copy is returned.  The copy is the
    network that ``effective_weights`` describes.
    """
    if _is_pt2e_quantized(quantized_model):
        return _without_activation_qdq(quantized_model)
    return copy.deepcopy(quantized_model)


# ----------------------------------------------------------------------------------------------
# Autotune objective: the certified bound instead of a validation set
# ----------------------------------------------------------------------------------------------
#
# ``neural_compressor.torch.quantization.autotune(model, tune_config, eval_fn, eval_args, run_fn,
# run_args, example_inputs)`` (``neural_compressor/torch/quantization/autotune.py``) first calls
# ``eval_fn`` on a deep copy of the float model (the baseline), then, for each configuration of
# ``TuningConfig.config_set`` in order, quantizes a deep copy of the model and calls ``eval_fn`` on
# it.  ``TuningMonitor.need_stop`` (``neural_compressor/common/base_tuning.py``) stops at the first
# trial with ``result >= baseline * (1 - tolerable_loss)`` (higher is better) or after
# ``max_trials``; the model returned is the best trial's (highest result), re-quantized if needed.
#
# The certified objective scores a candidate by ``1 - D(theta, theta') / ||Phi(theta)||_1``, with
# ``theta`` the reference's parameters and ``theta'`` the effective weights of the candidate.  The
# float baseline has ``D = 0`` and scores exactly 1, so autotune's test reads
# ``1 - D / ||Phi(theta)|| >= 1 - tolerable_loss``, i.e. ``D / ||Phi(theta)||_1 <= tolerable_loss``:
# ``tolerable_loss`` *is* the largest certified relative path-metric distance accepted, and every
# accepted model satisfies, for every input x,
# ``||R_theta(x) - R_theta'(x)||_1 <= tolerable_loss * max(1, ||x||_inf) * ||Phi(theta)||_1``.
# (A log-scale score such as ``-log10(D / ||Phi||)`` would give the baseline +inf and break that
# relative test.)  Only weights are scored: activation quantization of static configs is not part
# of the certificate (see the module docstring).

import weakref
from dataclasses import dataclass, field as _field

from neural_compressor.common.base_tuning import ConfigLoader
from neural_compressor.torch.quantization import TuningConfig, autotune

import pathsaliency
from pathsaliency.lifting import sample_shape

__all__ += ["certified_eval_fn", "CertifiedObjective", "autotune_certified", "CertifiedTuningResult",
            "NoCertifiedConfigError"]


@dataclass
class CertifiedTrial:
    """One evaluation of the certified objective: ``score = 1 - relative_distance``."""

    relative_distance: float
    score: float
    metric: Any  # pathsaliency.PathMetric
    quantized: bool  # False for a float candidate (autotune's baseline)


class CertifiedObjective:
    """``eval_fn`` for INC's ``autotune``: ``model -> 1 - D(reference, model) / ||Phi(reference)||_1``.

    Made by :func:`certified_eval_fn`.  Calling it with a candidate model returns the score and
    appends a :class:`CertifiedTrial` to ``history`` (autotune's baseline first, then one entry per
    trial); :meth:`certify` returns the ``PathMetric`` of a model without recording it.
    """

    def __init__(
        self,
        reference: nn.Module,
        input_shape: Any,
        *,
        example_inputs: Any = None,
        output: Any = None,
        dtype: torch.dtype = torch.float64,
    ):
        self.reference = reference
        self.input_shape = sample_shape(input_shape)
        self.example_inputs = None if example_inputs is None else _as_tuple(example_inputs)
        self.output = output
        self.dtype = dtype
        self.history: List[CertifiedTrial] = []
        self._foldings: Optional[List[Dict[str, Any]]] = None
        self._last: Optional[Tuple[Any, CertifiedTrial]] = None  # (weakref to the last model scored, its trial)

    def effective_weights(self, model: nn.Module) -> Tuple[Dict[str, torch.Tensor], bool]:
        """``(state dict of the reference's names, quantized?)`` for a candidate model."""
        if isinstance(model, fx.GraphModule):
            # PT2E: exported (baseline), or prepared/converted (trial); folded batch norms are undone
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.reference.modules())
            if has_bn and self._foldings is None:
                inputs = self.example_inputs or getattr(model, "example_inputs", None)
                if inputs is None:
                    raise ValueError(
                        f"{_SOURCE}: certified_eval_fn needs `example_inputs` (the inputs the model was exported "
                        "with) to map PT2E's folded batch norms back onto the reference"
                    )
                self._foldings = _bn_foldings(self.reference, _as_tuple(inputs))
            return _pt2e_effective_weights(model, self.reference, None, self._foldings), _is_pt2e_quantized(model)
        if any(isinstance(m, _woq_classes()) for m in model.modules()):
            return _woq_effective_weights(model, self.reference), True
        # a float model (autotune's baseline): its tensors under the reference's names
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        missing = [n for n, _ in self.reference.named_parameters(remove_duplicate=False) if n not in tensors]
        if missing:
            raise ValueError(
                f"{_SOURCE}: the candidate is neither INC-quantized nor a float model with the reference's "
                f"parameters (missing {missing[:5]})"
            )
        check_buffers(self.reference, ((n, t) for n, t in tensors.items()), source=_SOURCE)
        return assemble_weights(self.reference, tensors, source=_SOURCE), False

    def certify(self, model: nn.Module) -> "pathsaliency.PathMetric":
        """The certified distance ``D(reference, model)`` (a ``PathMetric``; ``.relative`` is ``D / ||Phi||``).

        Not recorded in ``history``; the model scored last is not computed again (autotune returns the
        object it scored last when that trial is accepted)."""
        if self._last is not None and self._last[0]() is model:
            return self._last[1].metric
        weights, _ = self.effective_weights(model)
        return pathsaliency.path_metric(self.reference, weights, self.input_shape, output=self.output, dtype=self.dtype)

    def __call__(self, model: nn.Module) -> float:
        weights, quantized = self.effective_weights(model)
        metric = pathsaliency.path_metric(
            self.reference, weights, self.input_shape, output=self.output, dtype=self.dtype
        )
        relative = float(metric.relative)
        trial = CertifiedTrial(relative, 1.0 - relative, metric, quantized)
        self.history.append(trial)
        self._last = (weakref.ref(model), trial)
        return trial.score


def certified_eval_fn(
    reference: nn.Module,
    input_shape: Any,
    *,
    example_inputs: Any = None,
    output: Any = None,
    dtype: torch.dtype = torch.float64,
) -> CertifiedObjective:
    """A data-free ``eval_fn`` for INC's ``autotune``: the certified bound of each candidate.

    ``autotune(model, TuningConfig(config_set, tolerable_loss=rho), eval_fn=certified_eval_fn(model,
    input_shape, example_inputs=...), run_fn=..., example_inputs=...)`` accepts the first
    configuration whose certified relative distance ``D / ||Phi(theta)||_1`` is at most ``rho``.

    The score of a candidate is ``1 - D(theta, theta') / ||Phi(theta)||_1`` (higher is better):
    ``theta`` are ``reference``'s parameters, ``theta'`` the weights the candidate computes with
    (``effective_weights`` of this module: PT2E static graphs with batch norms unfolded, weight-only
    ``INCWeightOnlyLinear.recover()``; a float candidate is read as it is) and ``D`` the certified
    l1 path-metric (``pathsaliency.path_metric``, float64 by default).  The float baseline scores
    exactly 1, so autotune's acceptance test ``score >= baseline * (1 - tolerable_loss)`` is exactly
    ``D / ||Phi(theta)||_1 <= tolerable_loss`` (up to one rounding of 1.0): set ``tolerable_loss`` to
    the largest relative certified distance you accept.  It guarantees
    ``||R_theta(x) - R_theta'(x)||_1 <= tolerable_loss * max(1, ||x||_inf) * ||Phi(theta)||_1`` for
    every input (``||Phi(theta)||_1`` is ``pathsaliency.path_norm(reference, input_shape)``).  The
    score can be negative (``D`` is at most ``||Phi(theta)|| + ||Phi(theta')||``).

    Args:
        reference: the float model autotune tunes (the ``model`` given to ``autotune``, or the model it
            was exported from); read, never modified.
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)``.
        example_inputs: the inputs the model was exported with; needed for PT2E (static/dynamic)
            configurations when the model has batch norms (PT2E folds them; they are mapped back).
        output, dtype: forwarded to ``pathsaliency.path_metric``.

    Only weight changes are certified: for static (W8A8) configurations the score ignores the
    activation quantization.  No data is used: calibration (``run_fn``) is still what INC needs for
    static activation ranges, but no validation set.
    """
    return CertifiedObjective(reference, input_shape, example_inputs=example_inputs, output=output, dtype=dtype)


@dataclass
class CertifiedTuningResult:
    """What :func:`autotune_certified` chose.

    ``model``: the quantized model autotune returned (a float copy for ``fallback="float"``);
    ``config``: its configuration (``None`` for the float fallback); ``metric``: the certified distance of
    ``model``'s weights to the reference (``metric.relative`` = ``relative_distance``);
    ``within_tolerance``: ``relative_distance <= max_relative_distance``; ``trials``: every configuration
    autotune evaluated, in order, with its certified relative distance.
    """

    model: Optional[nn.Module]
    config: Any
    metric: Any
    relative_distance: float
    max_relative_distance: float
    within_tolerance: bool
    trials: List[Tuple[Any, float]] = _field(default_factory=list)


class NoCertifiedConfigError(ValueError):
    """No configuration's certified relative distance is within the tolerance; ``.result`` holds the
    closest one (what autotune returned) and all the trials."""

    def __init__(self, message: str, result: CertifiedTuningResult):
        super().__init__(message)
        self.result = result


def _uses_pt2e(configs: Any) -> bool:
    from neural_compressor.torch.quantization.config import DynamicQuantConfig, INT8StaticQuantConfig

    items = configs if isinstance(configs, (list, tuple)) else [configs]
    return any(isinstance(c, (INT8StaticQuantConfig, DynamicQuantConfig)) for c in items)


def autotune_certified(
    model: nn.Module,
    configs: Any,
    input_shape: Any,
    example_inputs: Any,
    calibration_data: Optional[Iterable[Any]] = None,
    *,
    max_relative_distance: float,
    run_fn: Optional[Callable[[nn.Module], Any]] = None,
    transform_fn: Optional[Callable[[Any], Any]] = None,
    max_trials: int = 100,
    fallback: str = "raise",
    output: Any = None,
    dtype: torch.dtype = torch.float64,
) -> CertifiedTuningResult:
    """INC ``autotune`` with the certified objective: the first of ``configs`` whose certified
    relative distance ``D / ||Phi(theta)||_1`` is at most ``max_relative_distance``.

    ``configs`` (a config or a list; INC expands list-valued fields) should go from the most to the
    least aggressive: autotune tries them in order and stops at the first accepted one, e.g. all
    layers quantized first, then variants keeping more layers in float
    (``config.set_local("layer3.0.conv1", StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))``).
    The tuning is ``autotune(tuned, TuningConfig(configs, tolerable_loss=max_relative_distance,
    max_trials), eval_fn=certified_eval_fn(model, ...), run_fn, example_inputs)`` where ``tuned`` is
    ``model`` itself for weight-only configs and ``neural_compressor.torch.export.export(model,
    example_inputs)`` for PT2E (static/dynamic INT8) configs; ``model`` is never modified.

    Args:
        model: the float model (also the certificate's reference).
        configs: INC quantization config(s).
        input_shape: one input sample's shape, e.g. ``(3, 32, 32)``.
        example_inputs: model inputs for export / tracing (tensor or tuple).
        calibration_data: iterable of inputs or ``(x, y)`` pairs that ``run_fn`` feeds to the prepared
            model (static configs need it for activation ranges; it is not used to score anything).
            The exported graph is specialised to the shapes of ``example_inputs``: calibration
            batches must have those shapes.
        max_relative_distance: the tolerance on ``D / ||Phi(theta)||_1`` (autotune's ``tolerable_loss``).
        run_fn: calibration function ``run_fn(prepared_model)``; default runs ``calibration_data``.
        transform_fn: maps an item of ``calibration_data`` to the model input (default: first element
            of tuples/lists).
        max_trials: autotune's ``max_trials``.
        fallback: when no configuration is within tolerance: ``"raise"`` (``NoCertifiedConfigError``,
            whose ``.result`` has the closest one), ``"best"`` (return autotune's choice, the closest,
            with ``within_tolerance=False``) or ``"float"`` (return a float copy of ``model``, distance 0).
        output, dtype: forwarded to ``pathsaliency.path_metric``.
    """
    if fallback not in ("raise", "best", "float"):
        raise ValueError(f"{_SOURCE}: fallback must be 'raise', 'best' or 'float', got {fallback!r}")
    rho = float(max_relative_distance)
    if not rho >= 0:
        raise ValueError(f"{_SOURCE}: max_relative_distance must be >= 0, got {max_relative_distance}")
    example_inputs = _as_tuple(example_inputs)
    if run_fn is None and calibration_data is not None:
        transform = transform_fn or _model_input

        def run_fn(prepared: nn.Module) -> None:
            with torch.no_grad():
                for item in calibration_data:
                    _call(prepared, transform(item))

    pt2e = _uses_pt2e(configs)
    if pt2e and run_fn is None:
        raise ValueError(f"{_SOURCE}: static PT2E configurations need calibration_data (or run_fn) for activation ranges")
    work = copy.deepcopy(model).eval()
    objective = certified_eval_fn(model, input_shape, example_inputs=example_inputs, output=output, dtype=dtype)
    if pt2e:
        from neural_compressor.torch.export import export

        work = export(work, example_inputs)
        # the batch norms PT2E may fold, read from this export (saves exporting the reference again)
        objective._foldings = _bn_foldings(model, example_inputs, exported=work)
    # the configurations autotune will try, in its order (same expansion and de-duplication)
    planned = list(ConfigLoader(config_set=configs))
    tune_config = TuningConfig(config_set=configs, tolerable_loss=rho, max_trials=max_trials)
    chosen = autotune(work, tune_config, eval_fn=objective, run_fn=run_fn, example_inputs=example_inputs)

    baseline, evaluated = objective.history[0], objective.history[1:]
    trials = [(cfg, t.relative_distance) for cfg, t in zip(planned, evaluated)]
    # autotune's choice (TuningMonitor): the trial that met `score >= baseline * (1 - tolerable_loss)`
    # (the last one), otherwise the first trial with the highest score
    passed = [i for i, t in enumerate(evaluated) if t.score >= baseline.score * (1 - rho)]
    index = passed[0] if passed else max(range(len(evaluated)), key=lambda i: (evaluated[i].score, -i))
    config = trials[index][0] if index < len(trials) else None
    metric = objective.certify(chosen)  # the returned model itself (autotune may have re-quantized it)
    relative = float(metric.relative)
    result = CertifiedTuningResult(chosen, config, metric, relative, rho, relative <= rho, trials)
    if result.within_tolerance or fallback == "best":
        return result
    if fallback == "float":
        float_model = copy.deepcopy(model).eval()
        return CertifiedTuningResult(float_model, None, objective.certify(float_model), 0.0, rho, True, trials)
    raise NoCertifiedConfigError(
        f"{_SOURCE}: no configuration has a certified relative distance <= {rho:g} "
        f"(closest: {relative:.4g}; tried {[round(r, 6) for _, r in trials]})",
        result,
    )
