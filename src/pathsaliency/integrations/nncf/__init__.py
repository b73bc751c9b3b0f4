"""NNCF (3.4) integration: certify what NNCF's compressed models compute, and prune with path-magnitude.

* ``quantize.py``: ``quantize_int8`` (``nncf.quantize``, INT8 weights and activations) and
  ``compress_weights`` (``nncf.compress_weights``, weight-only INT8 / INT4 with an INT8 backup), on a copy.
* ``readback.py``: ``effective_theta(compressed, reference, *, example_inputs=None)`` -> ``pathsaliency.Theta``
  of the weights NNCF's model computes with (quantizers, decompressors and pruning masks applied), and
  ``disable_activation_quantizers`` (the network that certificate is about).
* ``pruning.py``: ``prune`` / ``update_pruning_ratio`` / path-magnitude schedulers inside ``nncf.prune``'s
  unstructured masks (imported on first use, so a change in NNCF's pruning modules cannot break the rest).
* ``precision.py``: which layers to keep float, chosen by the certificate under a size budget.
* ``_compat.py``: every NNCF name outside its public API.

The first NNCF quantization compiles a C++ extension, which takes minutes on a small machine; the entry
points here set ``NNCF_EXTENSION_LOAD_TIMEOUT`` to 900 s unless it is set already.
"""
from __future__ import annotations

try:
    import nncf  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without NNCF
    raise ImportError("pathsaliency.integrations.nncf needs NNCF: pip install 'pathsaliency[nncf]'") from e

from .._weights import load_effective_weights
from .precision import keep_float_by_certificate, quantize_mixed_int8
from .quantize import HookSafeSequential, compress_weights, quantize_int8
from .readback import disable_activation_quantizers, effective_theta, effective_weights, weight_quantizer_map

_PRUNING = {"prune", "update_pruning_ratio", "pruning_masks", "PathMagnitudeMultiStepScheduler",
            "PathMagnitudeExponentialScheduler"}

__all__ = [
    "quantize_int8", "compress_weights", "effective_theta", "effective_weights", "disable_activation_quantizers",
    "weight_quantizer_map", "load_effective_weights", "HookSafeSequential", "keep_float_by_certificate",
    "quantize_mixed_int8", *sorted(_PRUNING),
]


def __getattr__(name: str):
    """The pruning names, imported from ``pruning.py`` on first use."""
    if name in _PRUNING:
        from . import pruning

        return getattr(pruning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
