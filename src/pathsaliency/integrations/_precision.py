"""Mixed precision chosen by the certificate (framework-free): which layers stay float under a size budget.

With ``D_l`` the certified distance when only layer ``l`` is quantized (``pathsaliency.layer_distances``:
one forward and one backward pass give every ``D_l``) and ``n_l`` its number of weights, keeping the set
``F`` in float costs ``sum_{l in F} n_l * (float_bits - bits)`` bits over the all-quantized model and
removes ``D_l`` of the estimate ``sum_{l not in F} D_l`` of the certified distance (the certified distance
of the result is computed exactly afterwards; ``D`` is subadditive over layers only approximately, so the
sum is the objective, not the certificate).  The choice is the knapsack greedy by ``D_l / n_l``: layers
carrying the most certified distance per weight stay float first, while the budget allows.
:func:`keep_float_by_certificate` is the whole choice from a quantized model and the framework's read-back.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence

from torch import nn

import pathsaliency

__all__ = ["candidate_distances", "choose_float_layers", "keep_float_by_certificate", "weight_size_bits"]


def weight_size_bits(reference: nn.Module, float_layers: Sequence[str], layers: Sequence[str], *, bits: int = 8,
                     float_bits: int = 32) -> int:
    """Bits of the weights of ``layers`` when ``float_layers`` stay at ``float_bits`` and the others take ``bits``."""
    keep = set(float_layers)
    return sum(reference.get_submodule(n).weight.numel() * (float_bits if n in keep else bits) for n in layers)


def choose_float_layers(
    reference: nn.Module,
    distances: Mapping[str, object],
    max_size: float,
    *,
    bits: int = 8,
    float_bits: int = 32,
) -> List[str]:
    """Layers to keep float so that the weights of the layers in ``distances`` take at most
    ``max_size`` times their float size, chosen to minimise ``sum`` of the quantized layers' ``D_l``.

    ``distances``: ``{layer name: D_l}`` as returned by ``pathsaliency.layer_distances(reference,
    all_quantized, input_shape)`` (``PathMetric`` values; their ``.relative`` is used) for the layers that
    can be quantized (conv/linear modules with a ``weight``).  ``max_size`` is in
    ``[bits / float_bits, 1]``: ``bits / float_bits`` quantizes every layer, 1 keeps all float.
    Returns the names in ``distances``' order.
    """
    if not bits < float_bits:
        raise ValueError(f"bits ({bits}) must be below float_bits ({float_bits})")
    lowest = bits / float_bits
    if not lowest <= max_size <= 1:
        raise ValueError(f"max_size is a fraction of the float weight size in [{lowest:g}, 1], got {max_size!r}")
    sizes: Dict[str, int] = {}
    for name in distances:
        weight = getattr(reference.get_submodule(name), "weight", None)
        if weight is None:
            raise ValueError(f"layer {name!r} has no weight; pass the distances of conv/linear layers only")
        sizes[name] = weight.numel()
    spare = max_size * float_bits * sum(sizes.values()) - bits * sum(sizes.values())
    ranked = sorted(distances, key=lambda n: -_relative(distances[n]) / sizes[n])
    keep = set()
    for name in ranked:
        cost = sizes[name] * (float_bits - bits)
        if _relative(distances[name]) > 0 and cost <= spare:
            keep.add(name)
            spare -= cost
    return [n for n in distances if n in keep]


def _relative(d: object) -> float:
    return float(getattr(d, "relative", d))


def candidate_distances(reference: nn.Module, quantized, input_shape, *, output=None) -> Dict[str, object]:
    """``{layer: D_l}`` for the conv/linear layers (with a ``weight`` parameter) whose quantization
    changed theta (``D_l > 0``); ``quantized``: the ``pathsaliency.Theta`` an adapter read back from the
    all-quantized model. One forward and one backward pass (``pathsaliency.layer_distances``)."""
    distances = pathsaliency.layer_distances(reference, quantized, input_shape, output=output)
    return {n: d for n, d in distances.items() if d.log2 > float("-inf")
            and isinstance(getattr(reference.get_submodule(n), "weight", None), nn.Parameter)}


def keep_float_by_certificate(read_back: Callable, reference: nn.Module, compressed: nn.Module, input_shape,
                              max_size: float, *, bits: int = 8, example_inputs=None, output=None) -> List[str]:
    """The layers of ``reference`` to keep float so that the weight size is at most ``max_size`` times the
    float size and the summed single-layer certified distance of the quantized rest is smallest.

    ``compressed``: ``reference`` with every layer quantized to ``bits`` by a framework; ``read_back``: that
    framework's ``effective_theta(compressed, reference, example_inputs=...)``. :func:`choose_float_layers`
    over :func:`candidate_distances` of the read-back (only layers whose weight changed are candidates).
    """
    theta = read_back(compressed, reference, example_inputs=example_inputs)
    distances = candidate_distances(reference, theta, input_shape, output=output)
    return choose_float_layers(reference, distances, max_size, bits=bits)
