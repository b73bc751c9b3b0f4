"""Every Intel Neural Compressor name this adapter uses that is not in INC's documented public API
(``neural_compressor.torch.quantization``, ``neural_compressor.torch.export``).

Tested with INC 3.10 (pinned in pyproject).  Each accessor imports on first call, so a renamed private
module breaks only the feature that needs it.
"""
from __future__ import annotations

from typing import Any, Tuple


def weight_only_linear_types() -> Tuple[type, ...]:
    """INC's weight-only linear modules (``INCWeightOnlyLinear``: packed integers, ``recover()``)."""
    from neural_compressor.torch.algorithms.weight_only.modules import WeightOnlyLinear

    return (WeightOnlyLinear,)


def expand_configs(configs: Any) -> list:
    """The configurations autotune tries for ``config_set=configs``, in its order (INC's ``ConfigLoader``)."""
    from neural_compressor.common.base_tuning import ConfigLoader

    return list(ConfigLoader(config_set=configs))
