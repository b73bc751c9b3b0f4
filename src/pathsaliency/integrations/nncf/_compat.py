"""Every NNCF name this adapter uses that is not in NNCF's documented public API (``nncf``, ``nncf.torch``).

Tested with NNCF 3.4 (pinned in pyproject).  Each accessor imports on first call, so a renamed private
module breaks only the feature that needs it (e.g. a moved pruning module cannot break quantization).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Optional, Tuple

import torch

EXTENSION_TIMEOUT_S = "900"  # NNCF's default is 60 s; compiling its CPU extension takes minutes on 2 cores


def allow_slow_extension_build() -> None:
    """Set ``NNCF_EXTENSION_LOAD_TIMEOUT`` (read by NNCF when it loads its C++ extension) unless the user did.

    NNCF compiles a C++ extension the first time it quantizes; on a small machine this exceeds NNCF's
    60 s default and NNCF then falls back or fails.
    """
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", EXTENSION_TIMEOUT_S)


# ---- hooks (nncf/torch/function_hook) --------------------------------------------------------------


def hook_storage_attr() -> str:
    """Name of the submodule in which NNCF keeps a wrapped model's hooks (``__nncf_hooks``)."""
    from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE

    return ATR_HOOK_STORAGE


def hook_storage_class() -> type:
    from nncf.torch.function_hook.hook_storage import HookStorage

    return HookStorage


def is_wrapped(model: torch.nn.Module) -> bool:
    from nncf.torch.function_hook import is_wrapped as _is_wrapped

    return _is_wrapped(model)


def get_hook_storage(model: torch.nn.Module) -> Any:
    from nncf.torch.function_hook import get_hook_storage as _get

    return _get(model)


def decode_hook_name(name: str) -> Tuple[str, str, int]:
    """``"post_hooks.layer1:0:conv1:weight__0.0"`` -> ``("post_hooks", "layer1.0.conv1.weight", 0)``."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name as _decode

    return _decode(name)


# ---- hook module types -------------------------------------------------------------------------------


def quantizer_types() -> Tuple[type, ...]:
    """NNCF fake-quantizers, and torch's after ``nncf.strip(..., StripFormat.NATIVE)``."""
    from nncf.torch.quantization.layers import BaseQuantizer

    return (BaseQuantizer, torch.ao.quantization.FakeQuantizeBase)


def nncf_quantizer_type() -> type:
    from nncf.torch.quantization.layers import BaseQuantizer

    return BaseQuantizer


def decompressor_type() -> type:
    """Weight decompressors of ``nncf.compress_weights`` (stored int weight -> float weight)."""
    from nncf.torch.quantization.layers import BaseWeightsDecompressor

    return BaseWeightsDecompressor


@lru_cache(maxsize=None)
def pruning_mask_types() -> Tuple[type, ...]:
    """NNCF's unstructured pruning masks; ``()`` if this NNCF has moved them (quantization keeps working)."""
    try:
        from nncf.torch.function_hook.pruning.magnitude.modules import UnstructuredPruningMask
    except ImportError:  # pragma: no cover - another NNCF version
        return ()
    types: Tuple[type, ...] = (UnstructuredPruningMask,)
    try:
        from nncf.torch.function_hook.pruning.rb.modules import RBPruningMask

        types += (RBPruningMask,)
    except ImportError:  # pragma: no cover
        pass
    return types


# ---- graph (weight location by tracing) ------------------------------------------------------------------


def operator_metatype(fn_name: str) -> Any:
    import nncf.torch.graph.operator_metatypes as om

    return om.PT_OPERATOR_METATYPES.get_operator_metatype_by_op_name(fn_name)


def build_graph(model: torch.nn.Module, example_input: Any) -> Any:
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    return build_nncf_graph(model, example_input)


def constant_name(node: Any) -> Optional[str]:
    """The model tensor name of a constant node of NNCF's graph, ``None`` if it is not a named constant."""
    from nncf.common.graph.layer_attributes import ConstantLayerAttributes

    attrs = node.layer_attributes
    return attrs.name if isinstance(attrs, ConstantLayerAttributes) else None


def find_const_node(node: Any, graph: Any) -> Any:
    """The constant at the root of ``node``'s constant subgraph, or ``None`` (``node`` is not constant)."""
    from nncf.torch.model_graph_manager import find_const_node_in_constant_subgraph

    return find_const_node_in_constant_subgraph(node, graph)


def weight_subgraph_node_types() -> Any:
    """Node types NNCF allows between a weight and the op consuming it (its own quantize ops)."""
    from nncf.torch.model_graph_manager import AVAILABLE_NODE_TYPES_FOR_WEIGHT_SUBGRAPH

    return AVAILABLE_NODE_TYPES_FOR_WEIGHT_SUBGRAPH


# ---- unstructured pruning (nncf/torch/function_hook/pruning/magnitude) -------------------------------------


def get_pruned_modules(model: torch.nn.Module) -> dict:
    """``{constant name: UnstructuredPruningMask}`` of an NNCF-pruned model."""
    from nncf.torch.function_hook.pruning.magnitude.algo import get_pruned_modules as _get

    return _get(model)


def magnitude_schedulers() -> Tuple[type, type]:
    """``(MultiStepMagnitudePruningScheduler, ExponentialMagnitudePruningScheduler)``."""
    from nncf.torch.function_hook.pruning.magnitude.schedulers import (
        ExponentialMagnitudePruningScheduler,
        MultiStepMagnitudePruningScheduler,
    )

    return MultiStepMagnitudePruningScheduler, ExponentialMagnitudePruningScheduler
