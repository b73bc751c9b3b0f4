"""Mixed-precision INC static INT8 chosen by the certificate: the layers to keep float under a size budget.

``keep_float_by_certificate`` reads the all-quantized graph back (``effective_theta``), takes every
single-layer certified distance from ``pathsaliency.layer_distances`` and chooses the float layers with
``integrations._precision.choose_float_layers``; ``float_layers_config`` writes the choice as INC's
``set_local`` overrides, for ``quantize_static_int8(..., config=...)``; ``float_layer_configs`` gives one
such config per size budget, the candidates of ``autotune_certified`` from the most to the least aggressive.
"""
from __future__ import annotations

from typing import Any, List, Sequence

from neural_compressor.torch.quantization import StaticQuantConfig
from torch import nn

from .. import _precision
from .._precision import candidate_distances, choose_float_layers
from .readback import effective_theta

__all__ = ["keep_float_by_certificate", "float_layers_config", "float_layer_configs"]


def float_layers_config(float_layers: Sequence[str], **config_kwargs: Any) -> StaticQuantConfig:
    """``StaticQuantConfig(**config_kwargs)`` with ``set_local(name, fp32 weights and activations)`` for
    each of ``float_layers`` (module names, e.g. ``layer3.0.conv1``)."""
    config = StaticQuantConfig(**config_kwargs)
    for name in float_layers:
        config.set_local(name, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    return config


def keep_float_by_certificate(reference: nn.Module, compressed: nn.Module, input_shape: Any, max_size: float,
                              **options: Any) -> List[str]:
    """``integrations._precision.keep_float_by_certificate`` with INC's read-back ``effective_theta``:
    ``compressed`` is ``reference`` with every layer quantized by INC (e.g. ``quantize_static_int8``);
    ``options``: ``bits=8``, ``example_inputs``, ``output``."""
    return _precision.keep_float_by_certificate(effective_theta, reference, compressed, input_shape, max_size,
                                                **options)


def float_layer_configs(
    reference: nn.Module,
    compressed: nn.Module,
    input_shape: Any,
    sizes: Sequence[float],
    *,
    bits: int = 8,
    example_inputs: Any = None,
    output: Any = None,
    **config_kwargs: Any,
) -> List[StaticQuantConfig]:
    """``[float_layers_config(keep_float_by_certificate(..., size)) for size in sorted(sizes)]`` from one
    ``layer_distances`` pass: candidates for ``autotune_certified(reference, configs, ...)``, smallest
    size (most aggressive) first, so autotune stops at the smallest model within its certified tolerance."""
    theta = effective_theta(compressed, reference, example_inputs=example_inputs)
    distances = candidate_distances(reference, theta, input_shape, output=output)
    return [float_layers_config(choose_float_layers(reference, distances, size, bits=bits), **config_kwargs)
            for size in sorted(sizes)]
