"""Compressed models: read a module's theta as it computes, or refuse it with the function to call.

A compression framework often stores something other than the weights its model computes with: NNCF
keeps the float weight and applies pruning masks or fake-quantizers as hooks (``__nncf_hooks``), or
replaces the weight by int8 storage plus a decompressor; Intel Neural Compressor's ``WeightOnlyLinear``
packs integers; a PT2E graph holds quantize/dequantize operators around its constants. Reading the
stored tensors of such a model certifies the wrong network (a pruned model at distance 0, int8 codes
read as weights), so :func:`module_tensors` raises :class:`CompressedModelError` naming the adapter
whose ``effective_theta(compressed, reference)`` reads the effective weights back.

Recognised by the class's defining module, NNCF's hook-storage attribute, the operators of an fx graph
and the dtype of the weights; no framework is imported. Two torch mechanisms need no framework and are
read here: ``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask``, computed by the pruning
method) and ``torch.nn.utils.parametrize`` (``weight`` as its parametrization computes it).
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize, prune

from .errors import PathSaliencyError

__all__ = ["CompressedModelError", "module_tensors", "check_storage"]

_NNCF_HOOKS = "__nncf_hooks"  # nncf.torch.function_hook.wrapper.ATR_HOOK_STORAGE
_NNCF_HINT = "use pathsaliency.integrations.nncf.effective_theta(model, reference)"
_INC_HINT = "use pathsaliency.integrations.neural_compressor.effective_theta(model, reference)"
_NOT_THE_WEIGHTS = "its stored weights are not the ones it computes with"


class CompressedModelError(PathSaliencyError):
    """A compressed model whose stored tensors are not the weights it computes with; the message says
    which ``effective_theta`` reads them back."""


def module_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors ``model`` computes with, by qualified name (parameters and buffers, shared tensors
    under every name), plus ``torch.nn.utils.prune``'d and parametrized tensors as computed, under the
    name of the attribute they replace (their stored originals stay listed too, so that a cache keyed on
    the tensors sees them change). Raises :class:`CompressedModelError` for a model read through an
    adapter (see the module docstring)."""
    modules = list(model.named_modules(remove_duplicate=False))  # one walk of the tree serves every read below
    _refuse_framework_models(model, modules)
    parameters, buffers, computed = {}, {}, {}  # in named_parameters(), then named_buffers() order
    for prefix, m in modules:
        dot = f"{prefix}." if prefix else ""
        parameters.update((dot + k, p) for k, p in m._parameters.items() if p is not None)
        buffers.update((dot + k, b) for k, b in m._buffers.items() if b is not None)
        if parametrize.is_parametrized(m):
            for attr in m.parametrizations:
                with torch.no_grad():
                    computed[dot + attr] = getattr(m, attr)
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                attr = hook._tensor_name
                with torch.no_grad():
                    computed[dot + attr] = hook.apply_mask(m)
    out = {**parameters, **buffers, **computed}
    check_storage(out, "model")
    return out


def check_storage(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a weight or bias held as integers (compressed storage, not a value of theta), and the
    tensors of an NNCF-wrapped model (its hooks, e.g. pruning masks, change what it computes with)."""
    hooked = next((n for n in tensors if _NNCF_HOOKS in n.split(".")), None)
    if hooked is not None:
        raise CompressedModelError(f"the {what} holds NNCF hook tensors (e.g. '{hooked}'): it is an NNCF-wrapped "
                                   f"model's, {_NOT_THE_WEIGHTS}; {_NNCF_HINT}")
    bad = [n for n, t in tensors.items() if n.rsplit(".", 1)[-1] in ("weight", "bias")
           and torch.is_tensor(t) and not (t.is_floating_point() or t.is_complex())]
    if bad:
        dtype = tensors[bad[0]].dtype
        raise CompressedModelError(
            f"the {what} holds '{bad[0]}'{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} as {dtype}: "
            f"compressed storage, {_NOT_THE_WEIGHTS}; read the dequantized weights with the framework's "
            f"adapter (NNCF: {_NNCF_HINT}; Intel Neural Compressor: {_INC_HINT}), or give "
            "pathsaliency.Theta.from_folded the dequantized values")


def _refuse_framework_models(model: nn.Module, modules) -> None:
    """``modules``: ``model.named_modules(remove_duplicate=False)`` as a list (each module counted once here)."""
    unique, seen = [], set()
    for name, m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            unique.append((name, m))
    modules = unique
    storage = getattr(model, _NNCF_HOOKS, None)  # emptied by nncf.strip(..., IN_PLACE): then a plain model
    nncf = [(name, type(m)) for name, m in modules
            if type(m).__module__.split(".")[0] == "nncf" and m is not storage]
    if nncf:
        kinds = {cls.__name__ for _, cls in nncf}
        what = ("pruning masks" if any("Pruning" in k for k in kinds) else
                "weight decompressors (nncf.compress_weights)" if any("Decompressor" in k for k in kinds) else
                "quantizers" if any("Quantizer" in k for k in kinds) else "hooks")
        layers = _nncf_hooked_layers(model)
        where = f" on {', '.join(repr(l) for l in layers[:3])}{', ...' if len(layers) > 3 else ''}" if layers else ""
        raise CompressedModelError(f"the model is an NNCF-wrapped model (nncf.torch {what}{where}): "
                                   f"{_NOT_THE_WEIGHTS}; {_NNCF_HINT}")
    inc = [(name, type(m)) for name, m in modules
           if type(m).__module__.split(".")[0] == "neural_compressor"]
    if inc:
        name, cls = inc[0]
        raise CompressedModelError(f"the model holds Intel Neural Compressor modules ({cls.__name__} at "
                                   f"'{name or '<root>'}'{f' and {len(inc) - 1} more' if len(inc) > 1 else ''}): "
                                   f"{_NOT_THE_WEIGHTS}; {_INC_HINT}")
    for name, m in modules:
        if isinstance(m, fx.GraphModule):
            qdq = [n for n in m.graph.nodes if n.op == "call_function" and _is_qdq(n.target)]
            if qdq:
                raise CompressedModelError(
                    f"the model{f' (submodule {name!r})' if name else ''} is a PT2E quantized graph "
                    f"({len(qdq)} quantize/dequantize nodes, e.g. {qdq[0].name!r}): {_NOT_THE_WEIGHTS}; "
                    f"{_INC_HINT} (it evaluates the graph's dequantized constants)")


def _is_qdq(target) -> bool:
    """A PT2E quantize/dequantize operator (``quantized_decomposed`` or ``torchao`` namespace)."""
    name = str(target)
    return name.split(".")[0] in ("quantized_decomposed", "torchao") and "quantize" in name


def _nncf_hooked_layers(model: nn.Module) -> list:
    """The layers NNCF's hook storage names (keys ``'<layer>:weight__0'`` or ``'<op>/conv2d/0__1'``), in
    the model's module order."""
    storage = getattr(model, _NNCF_HOOKS, None)
    if not isinstance(storage, nn.Module):
        return []
    layers = []
    for group in storage.children():
        for key in getattr(group, "keys", lambda: [])():
            op = key.rsplit("__", 1)[0]  # an operation 'a:b:conv/conv2d/0' or a parameter 'a:b:conv:weight'
            layer = op.split("/")[0] if "/" in op else op.rsplit(":", 1)[0]
            layer = layer.replace(":", ".")
            if layer and layer not in layers:
                layers.append(layer)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(layers, key=lambda name: order.get(name, len(order)))
