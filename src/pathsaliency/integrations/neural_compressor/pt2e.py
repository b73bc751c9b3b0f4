"""Reading an INC PT2E (static INT8) graph: the constant q/dq subgraph of each weight, and PT2E's batch-norm folding.

INC 3.10's PT2E flow (``neural_compressor/torch/export``, ``.../algorithms/pt2e_quant/core.py``, which
calls ``torchao.quantization.pt2e.prepare_pt2e/convert_pt2e`` with an ``X86InductorQuantizer``) returns a
``torch.fx.GraphModule`` (from ``torch.export``) whose parameters keep the original names.  Each weight
reaches its conv/linear through ``get_attr(w) -> quantize_per_channel(w, _scale_k, _zero_point_k, axis,
-128, 127, int8) -> dequantize_per_channel(...)``; activations go through ``quantize_per_tensor ->
dequantize_per_tensor`` pairs.  Batch norms that follow a conv (or a linear with 2-D input) are folded into
it before quantization (``fold_bn_weights_into_conv_node``): the weight parameter then holds ``w * s`` with
``s = gamma / sqrt(running_var + eps)``, its bias the folded bias (a new ``<weight>_bias`` parameter when
the conv had none), and the batch norm is gone.

``folded_theta`` gives ``Theta.from_folded`` those folded values as they are (``q(w * s)``, the folded
bias): the step of a conv with its batch norm folded in.  ``unfolded_state`` expresses the same network on
the reference's unfolded parameters (``w' = q(w * s) / s``, batch norm unchanged) for the state-dict API.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from pathsaliency import steps

from .. import _weights
from .quantize import _as_tuple

_SOURCE = "pathsaliency.integrations.neural_compressor"


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

    ``step`` is the producer's affine step class (``steps.ConvStep``,
    ``ConvTransposeStep`` or ``LinearStep``) when PT2E may have folded the batch
    norm into it (``weight``/``bias`` are then the producer's parameter names),
    ``None`` otherwise.  ``exported``: the reference
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
        fold: Dict[str, Any] = {"step": None, "weight": None, "bias": None, "bn": names, "eps": float(bn["eps"])}
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
        fold["step"] = (steps.ConvTransposeStep if kind in _CONV_T_TARGETS
                        else steps.LinearStep if kind == "linear" else steps.ConvStep)
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
    if fold["step"] is steps.LinearStep:
        scale, bias0 = torch.nn.utils.fusion.fuse_linear_bn_weights(ones, None, *stats, *affine)
    else:
        scale, bias0 = torch.nn.utils.fusion.fuse_conv_bn_weights(
            ones, None, *stats, *affine, transpose=fold["step"] is steps.ConvTransposeStep
        )
    scale, bias0 = scale.detach(), bias0.detach()
    values[w_name] = _safe_div(values[w_name].detach().to(w_ref), scale, w_ref)

    channel_dim = fold["step"].weight_dims[0]  # the weight's output-channel dim
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


def _graph_parameters(gm: fx.GraphModule, reference: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(values of the reference's tensors as the graph uses them, tensors the graph reads directly)``.

    Quantized weights are the value of their constant q/dq subgraph; other tensors (biases, batch-norm
    statistics still in the graph) are read as stored.  Reference tensors the graph does not use (unused
    layers, weights of folded batch norms) are absent."""
    quantized, direct = _pt2e_graph_values(gm)
    ref_tensors = dict(reference.state_dict(keep_vars=True))
    unknown = sorted(set(quantized) - set(ref_tensors))
    if unknown:
        raise ValueError(f"{_SOURCE}: quantized tensors {unknown} are not parameters of the reference")
    values = {n: v for n, v in direct.items() if n in ref_tensors}
    values.update(quantized)
    return values, direct


def _folds(
    gm: fx.GraphModule,
    reference: nn.Module,
    used: set,
    example_inputs: Any = None,
    foldings: Optional[List[Dict[str, Any]]] = None,
) -> List[Dict[str, Any]]:
    """The batch norms of ``reference`` that PT2E folded into their conv/linear in ``gm`` (gone from it).

    ``foldings``: ``_bn_foldings(reference, example_inputs)`` computed beforehand (it exports the
    reference), for callers that read many graphs against one reference."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in reference.modules()):
        return []
    if foldings is None:
        if example_inputs is None:
            example_inputs = getattr(gm, "example_inputs", None)
        if example_inputs is None:
            raise ValueError(
                f"{_SOURCE}: the reference has batch norms that PT2E may have folded; pass "
                "`example_inputs` (the inputs used to export) to find them"
            )
        foldings = _bn_foldings(reference, _as_tuple(example_inputs))
    out, weights = [], set()
    for fold in foldings:
        if any(n in used for n in fold["bn"].values() if n is not None):
            continue  # this batch norm is still in the quantized graph: nothing was folded
        if fold["step"] is None:
            raise ValueError(
                f"{_SOURCE}: batch norm {fold['bn']} is gone from the quantized graph but does not "
                "follow a conv/linear; cannot map its effect back onto the reference"
            )
        if fold["weight"] in weights:
            raise ValueError(f"{_SOURCE}: {fold['weight']!r} feeds several folded batch norms; unsupported")
        weights.add(fold["weight"])
        out.append(fold)
    return out


def folded_theta(gm: fx.GraphModule, reference: nn.Module, example_inputs: Any = None,
                 foldings: Optional[List[Dict[str, Any]]] = None):
    """``Theta`` of what ``gm`` computes with: its tensors on the reference's architecture, and for every
    conv/linear with a batch norm PT2E folded, that step's folded values ``(q(w * s), b_f)`` as stored."""
    from pathsaliency import Theta

    values, direct = _graph_parameters(gm, reference)
    state = {name: values.get(name, tensor).detach() for name, tensor in reference.state_dict(keep_vars=True).items()}
    layers = {}
    for fold in _folds(gm, reference, set(direct) | set(values), example_inputs, foldings):
        w_name, b_name = fold["weight"], fold["bias"]
        bias_name = b_name if b_name is not None else w_name + "_bias"
        if w_name not in values or bias_name not in direct:
            raise ValueError(f"{_SOURCE}: the batch norm after {w_name!r} was folded but the graph does not "
                             f"read {w_name!r} and {bias_name!r}")
        layers[w_name.rpartition(".")[0]] = (values[w_name].detach(), direct[bias_name].detach())
    theta = Theta.from_state_dict(reference, state)
    return Theta.from_folded(reference, {**theta.layers, **layers}) if layers else theta


def unfolded_state(gm: fx.GraphModule, reference: nn.Module, example_inputs: Any = None,
                   foldings: Optional[List[Dict[str, Any]]] = None) -> Dict[str, torch.Tensor]:
    """The network of ``folded_theta`` as a state dict of the reference's unfolded parameters (float32):
    each folded weight divided back by its batch-norm scale, batch norms kept (``_unfold_bn``)."""
    values, direct = _graph_parameters(gm, reference)
    ref_params = dict(reference.named_parameters())
    ref_buffers = dict(reference.named_buffers())
    _weights.check_buffers(reference, ((n, v) for n, v in direct.items() if n in ref_buffers), source=_SOURCE)
    values = {n: v for n, v in values.items() if n in ref_params}
    for fold in _folds(gm, reference, set(direct) | set(values), example_inputs, foldings):
        _unfold_bn(fold, reference, values, direct)
    for name, param in ref_params.items():  # parameters the graph does not use (unused layers) are unchanged
        values.setdefault(name, param)
    return _weights.assemble_weights(reference, values, source=_SOURCE)


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

