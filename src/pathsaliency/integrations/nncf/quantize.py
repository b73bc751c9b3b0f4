"""NNCF compression entry points on a copy of the user's model: ``nncf.quantize`` (INT8 PTQ) and
``nncf.compress_weights`` (weight-only INT8 / INT4).

Both return NNCF's own model; ``effective_theta`` (``readback.py``) reads back the weights it computes with.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional

import nncf
from torch import nn

from . import _compat

__all__ = ["quantize_int8", "compress_weights", "HookSafeSequential"]


class HookSafeSequential(nn.Sequential):
    """``nn.Sequential`` that skips NNCF's ``HookStorage`` child when iterating.

    NNCF registers its hook storage as a submodule of the model it wraps; a plain ``nn.Sequential`` would
    then call it as a layer and fail (``HookStorage`` has no ``forward``).  The entry points here swap the
    class of the *copy* they compress to this one; parameter names are unchanged.
    """

    def forward(self, input):  # noqa: A002 - same signature as nn.Sequential
        storage = _compat.hook_storage_class()
        for module in self:
            if isinstance(module, storage):
                continue
            input = module(input)
        return input


def hook_safe_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode that NNCF can wrap (a plain ``nn.Sequential`` made hook safe)."""
    work = copy.deepcopy(model).eval()
    if type(work) is nn.Sequential:
        work.__class__ = HookSafeSequential
    return work


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
        model: float torch model; never modified (a deep copy in eval mode is quantized).  A top-level
            plain ``nn.Sequential`` is quantized as a ``HookSafeSequential`` (same parameters).
        calibration_data: any iterable NNCF can iterate more than once, e.g. a list of input tensors, a
            list of ``(x, y)`` pairs or a ``torch.utils.data.DataLoader`` yielding ``(x, y)`` batches.
            With the default ``transform_fn`` a tuple/list item contributes its first element as the
            model input; any other item is the input.
        subset_size: number of calibration samples NNCF uses (``nncf.quantize``'s ``subset_size``;
            batches count as ``batch_size`` samples).
        transform_fn: maps one item of ``calibration_data`` to the model input.
        **nncf_kwargs: forwarded to ``nncf.quantize`` (``preset``, ``fast_bias_correction``,
            ``ignored_scope``, ``target_device``, ``advanced_parameters``, ...).

    Returns:
        The NNCF-quantized copy (weights and activations fake-quantized).  Its weights are certified
        through ``effective_theta``; its activation quantization is not.
    """
    _compat.allow_slow_extension_build()
    dataset = nncf.Dataset(calibration_data, transform_fn or _model_input)
    return nncf.quantize(hook_safe_copy(model), dataset, subset_size=subset_size, **nncf_kwargs)


def compress_weights(
    model: nn.Module,
    dataset: Iterable[Any],
    mode: "nncf.CompressWeightsMode" = nncf.CompressWeightsMode.INT8_ASYM,
    *,
    transform_fn: Optional[Callable[[Any], Any]] = None,
    **nncf_kwargs: Any,
) -> nn.Module:
    """Weight-only compression of a deep copy of ``model`` with ``nncf.compress_weights``.

    ``mode`` INT8_ASYM / INT8_SYM quantizes every conv and linear weight to 8 bits per output channel;
    INT4_SYM / INT4_ASYM quantizes the linear (matmul) weights to 4 bits in groups (``group_size``,
    ``ratio``, ``all_layers`` in ``nncf_kwargs``) and every other weight (convolutions; the last layer
    unless ``all_layers=True``) to the backup precision (``backup_mode``, INT8_ASYM by default).
    NNCF stores the integer weights and puts a decompressor hook on each; activations stay float, so
    the certificate on ``effective_theta`` covers the compressed model completely.

    ``dataset``: an iterable of model inputs or ``(x, y)`` pairs (``transform_fn`` maps an item to the
    input), at least one: NNCF traces the model with the first item; data-aware options (AWQ, scale
    estimation, ``ratio < 1``) use more.  ``model`` is never modified.
    """
    _compat.allow_slow_extension_build()
    data = nncf.Dataset(dataset, transform_fn or _model_input)
    return nncf.compress_weights(hook_safe_copy(model), mode=mode, dataset=data, **nncf_kwargs)
