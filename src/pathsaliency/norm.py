"""``path_norm``: the l1 (or l^q) path-norm ``||Phi(theta)||_1`` in one forward pass (MATH.md section 2)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lifting import compute_dtype, lift
from .interpreter import norm_pass
from .precision import ieee_float32

LOG10_2 = math.log10(2.0)


@dataclass(frozen=True)
class PathValue:
    """A non-negative number that may exceed float64, kept as its base-2 logarithm.

    ``log10`` is always finite for a positive number; ``value`` (and ``float(result)``) is the float,
    ``inf`` only where the number itself exceeds the float64 range.
    """

    log2: float

    @property
    def log10(self) -> float:
        return self.log2 * LOG10_2

    @property
    def value(self) -> float:
        if math.isnan(self.log2):
            return math.nan
        if self.log2 == -math.inf:
            return 0.0
        if self.log2 >= 1024:
            return math.inf
        exp = math.floor(self.log2)
        return math.ldexp(2.0 ** (self.log2 - exp), exp)

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(log10={self.log10:.6g}, value={self.value:.6g})"


@ieee_float32()
def path_norm(model, input_shape, q=1, *, output=None, dtype=torch.float32) -> PathValue:
    """``||Phi(theta)||_q^q``: the sum over all paths of ``|product of weights along the path|**q``.

    One pass of the network with every parameter replaced by ``|theta|**q`` (frozen batch-norm folded),
    ReLU as the identity, max-pooling as a window sum, on an all-ones input of shape ``input_shape``
    (one sample, e.g. ``(3, 224, 224)``; a leading batch dimension of 1 is accepted); the outputs are
    summed. A running power-of-two scale keeps every tensor in range (MATH.md section 5).

    ``output`` picks the tensor of a model that returns a tuple or dict (an index, a key or a callable).
    ``dtype``: float32 (default: fast, relative error about 1e-6) or float64.
    """
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"q must be a positive finite number (the l^q path-norm), got {q!r}")
    dtype = compute_dtype(dtype)
    lifted = lift(model, output)
    shape = lifted.sample_shape(input_shape)
    with torch.no_grad():
        log2, _ = norm_pass(lifted.plan, lifted.absolute(model, dtype, q), shape, q=q, dtype=dtype,
                            device=lifted.device, keep=False)
    return PathValue(float(log2[0]))
