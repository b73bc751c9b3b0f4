"""Mixed-precision NNCF models chosen by the certificate: the layers to keep float under a size budget.

``keep_float_by_certificate`` reads the all-quantized model back (``effective_theta``), takes every
single-layer certified distance from ``pathsaliency.layer_distances`` (one forward + backward pass) and
chooses the float layers with ``integrations._precision.choose_float_layers``; ``ignored_scope`` turns the
choice into NNCF's ``IgnoredScope`` for ``nncf.quantize`` / ``nncf.compress_weights``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import nncf
from torch import nn

from .. import _precision
from .quantize import _model_input, compress_weights, quantize_int8
from .readback import effective_theta

__all__ = ["keep_float_by_certificate", "ignored_scope", "quantize_mixed_int8"]


def ignored_scope(layers: Sequence[str]) -> "nncf.IgnoredScope":
    """``nncf.IgnoredScope`` of the ops of the modules ``layers`` (NNCF names a module's op
    ``<module path with '/'>/<function>/<call index>``, e.g. ``layer1/0/conv1/conv2d/0``)."""
    patterns = [f"^{re.escape(name.replace('.', '/'))}/[A-Za-z0-9_]+/[0-9]+$" for name in layers]
    return nncf.IgnoredScope(patterns=patterns, validate=False)


def keep_float_by_certificate(reference: nn.Module, compressed: nn.Module, input_shape: Any, max_size: float,
                              **options: Any) -> List[str]:
    """``integrations._precision.keep_float_by_certificate`` with NNCF's read-back ``effective_theta``:
    ``compressed`` is ``reference`` with every layer quantized by NNCF (``quantize_int8`` or
    ``compress_weights``); ``options``: ``bits=8``, ``example_inputs``, ``output``."""
    return _precision.keep_float_by_certificate(effective_theta, reference, compressed, input_shape, max_size,
                                                **options)


def quantize_mixed_int8(
    model: nn.Module,
    calibration_data: Iterable[Any],
    input_shape: Any,
    max_size: float,
    *,
    weights_only: bool = False,
    transform_fn: Optional[Callable[[Any], Any]] = None,
    **nncf_kwargs: Any,
) -> Tuple[nn.Module, List[str]]:
    """``(NNCF INT8 model with the certificate's float layers left out, those layers)``.

    Quantizes a copy of ``model`` fully (``quantize_int8``, or ``compress_weights`` INT8_ASYM when
    ``weights_only``), chooses the float layers with ``keep_float_by_certificate(model, that, input_shape,
    max_size)``, and quantizes again with ``ignored_scope`` of those layers.  ``nncf_kwargs`` go to both
    NNCF calls (not ``ignored_scope``).  ``model`` is never modified.
    """
    data = list(calibration_data)
    subset_size = nncf_kwargs.pop("subset_size", len(data))

    def run(scope: Optional["nncf.IgnoredScope"]) -> nn.Module:
        kwargs = dict(nncf_kwargs) if scope is None else {**nncf_kwargs, "ignored_scope": scope}
        if weights_only:
            return compress_weights(model, data, transform_fn=transform_fn, **kwargs)
        return quantize_int8(model, data, subset_size=subset_size, transform_fn=transform_fn, **kwargs)

    example = (transform_fn or _model_input)(data[0])
    float_layers = keep_float_by_certificate(model, run(None), input_shape, max_size, example_inputs=example)
    return (run(ignored_scope(float_layers)) if float_layers else run(None)), float_layers
