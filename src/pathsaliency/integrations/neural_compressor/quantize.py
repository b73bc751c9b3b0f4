"""INC quantization entry points on a copy of the user's model: static INT8 (PT2E) and weight-only RTN."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
from neural_compressor.torch.quantization import RTNConfig, StaticQuantConfig, convert, prepare
from torch import fx, nn

__all__ = ["quantize_static_int8", "quantize_weight_only"]

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




def _shapes(inputs: Any) -> Any:
    """The shapes of the tensors in one model input (tensor, tuple/list or dict), ``None`` elsewhere."""
    if torch.is_tensor(inputs):
        return tuple(inputs.shape)
    if isinstance(inputs, (tuple, list)):
        return tuple(_shapes(x) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _shapes(v) for k, v in inputs.items()}
    return None


def _check_static_shapes(example_inputs: Tuple[Any, ...], inputs: Any, index: int) -> None:
    """An exported graph without ``dynamic_shapes`` only runs on the shapes it was exported with."""
    expected, got = _shapes(example_inputs), _shapes(_as_tuple(inputs))
    if expected != got:
        raise ValueError(
            f"{_SOURCE}: calibration item {index} has input shapes {got}, the model was exported with "
            f"example_inputs of shapes {expected}; give example_inputs of the calibration batch size, or "
            "export with a dynamic batch: dynamic_shapes=({0: torch.export.Dim('batch')},)"
        )


def quantize_static_int8(
    model: nn.Module,
    example_inputs: Any,
    calibration_data: Iterable[Any],
    transform_fn: Optional[Callable[[Any], Any]] = None,
    dynamic_shapes: Any = None,
    config: Optional[StaticQuantConfig] = None,
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
        dynamic_shapes: forwarded to ``torch.export``; without it every calibration input must have the
            shapes of ``example_inputs`` (checked before it runs: ``ValueError`` naming both shapes).
        config: the ``StaticQuantConfig`` to use (e.g. with ``set_local`` overrides, see
            ``float_layers_config``); default ``StaticQuantConfig(**config_kwargs)``.
        **config_kwargs: forwarded to ``StaticQuantConfig`` when ``config`` is not given.

    Returns:
        The converted ``torch.fx.GraphModule`` (quantize/dequantize ops on weights
        and activations).  ``example_inputs`` is stored on it as attribute
        ``example_inputs`` (as INC does on prepared models), which
        ``effective_theta`` uses to find the batch norms PT2E folded.
    """
    from neural_compressor.torch.export import export

    example_inputs = _as_tuple(example_inputs)
    work = copy.deepcopy(model).eval()
    exported = export(work, example_inputs, dynamic_shapes=dynamic_shapes)
    prepared = prepare(exported, config if config is not None else StaticQuantConfig(**config_kwargs),
                       example_inputs=example_inputs)
    transform = transform_fn or _model_input
    with torch.no_grad():
        for index, item in enumerate(calibration_data):
            inputs = transform(item)
            if dynamic_shapes is None:
                _check_static_shapes(example_inputs, inputs, index)
            _call(prepared, inputs)
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
