"""Intel Neural Compressor 3.10 (PyTorch) integration: certify what INC's quantized models compute.

* ``quantize.py``: ``quantize_static_int8`` (PT2E static W8A8) and ``quantize_weight_only`` (RTN, which
  INC 3.10 applies to ``nn.Linear`` layers only), on a copy.
* ``readback.py``: ``effective_theta(compressed, reference, *, example_inputs=None)`` -> ``pathsaliency.Theta``
  of the weights the quantized model computes with (``pt2e.py`` reads PT2E graphs; folded batch norms are
  handed over folded), and ``disable_activation_quantizers``.
* ``autotune.py``: ``certified_eval_fn`` / ``autotune_certified``, INC's ``autotune`` with the certified
  distance as its (data-free) objective.
* ``precision.py``: which layers stay float, chosen by the certificate under a size budget, as INC configs.
* ``_compat.py``: every INC name outside its public API.
"""
from __future__ import annotations

try:
    import neural_compressor.torch  # noqa: F401
    from neural_compressor.torch.quantization import StaticQuantConfig  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without INC
    raise ImportError(
        "pathsaliency.integrations.neural_compressor needs Intel Neural Compressor: pip install 'pathsaliency[inc]'"
    ) from e

from .._weights import load_effective_weights
from .autotune import (CertifiedObjective, CertifiedTuningResult, NoCertifiedConfigError, autotune_certified,
                       certified_eval_fn)
from .precision import float_layer_configs, float_layers_config, keep_float_by_certificate
from .quantize import quantize_static_int8, quantize_weight_only
from .readback import disable_activation_quantizers, effective_theta, effective_weights

__all__ = [
    "quantize_static_int8", "quantize_weight_only", "effective_theta", "effective_weights",
    "disable_activation_quantizers", "load_effective_weights", "certified_eval_fn", "CertifiedObjective",
    "autotune_certified", "CertifiedTuningResult", "NoCertifiedConfigError", "keep_float_by_certificate",
    "float_layers_config", "float_layer_configs",
]
