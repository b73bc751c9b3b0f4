"""Activations with a per-sample power-of-two scale: ``t * 2**e`` (MATH.md section 5).

After each operator that can grow values the tensor is divided by the power of two nearest above its
maximum and ``e`` keeps the count (on a CPU only when that maximum has left ``[2**-16, 2**16]``:
:func:`settle`). Powers of two make the rescaling exact, so nothing overflows and rescaling invariance
stays bit-exact. All tensors are non-negative; nothing is ever subtracted.
"""
from __future__ import annotations

import torch


class Scaled:
    """``t * 2**e``: ``t`` of shape ``(B, ...)``, ``e`` of shape ``(B,)`` (integer-valued floats).

    Deliberately not a tuple, so that ``torch.fx`` argument mapping treats it as one leaf."""

    __slots__ = ("t", "e")

    def __init__(self, t: torch.Tensor, e: torch.Tensor):
        self.t, self.e = t, e

    def expand(self, num: int) -> "Scaled":
        """The same value for ``num`` samples (a broadcast view when it holds one)."""
        if self.t.shape[0] == num:
            return self
        return Scaled(self.t.expand(num, *self.t.shape[1:]), self.e.expand(num))

    def detach(self) -> "Scaled":
        return Scaled(self.t.detach(), self.e)


def pow2(k: torch.Tensor, ndim: int) -> torch.Tensor:
    """``2**k`` per sample, shaped to broadcast over a tensor of ``ndim`` dimensions."""
    return torch.exp2(k).view((-1,) + (1,) * (ndim - 1))


def _sample_max(t: torch.Tensor) -> torch.Tensor:
    """Each sample's maximum (shape ``(B,)``), read in the tensor's own memory layout (no copy)."""
    return t.detach().amax(tuple(range(1, t.dim()))) if t.dim() > 1 else t.detach()


def renorm(x: Scaled) -> Scaled:
    """Divide each sample by the power of two just above its maximum (exact), count it in ``e``."""
    t = x.t
    m = _sample_max(t)
    _, k = torch.frexp(m)
    k = k.to(t.dtype)
    return Scaled(t * pow2(-k, t.dim()), x.e + k)


def settle(x: Scaled, slack: int = 16) -> Scaled:
    """:func:`renorm` only where needed: on a CPU a value whose every sample's maximum lies in
    ``[2**-slack, 2**slack]`` is returned as it is (the same number: rescaling by a power of two is exact,
    so skipping it changes no later result), saving the multiplication over the whole tensor. On other
    devices (no host round trip per operator) it is :func:`renorm`."""
    t = x.t
    if t.device.type != "cpu":
        return renorm(x)
    _, k = torch.frexp(_sample_max(t))
    if bool((k.abs() <= slack).all()):
        return x
    k = k.to(t.dtype)
    return Scaled(t * pow2(-k, t.dim()), x.e + k)


def same_exponent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a == b`` everywhere (broadcasting), checked only on a CPU (elsewhere False: no host round trip)."""
    return a.device.type == "cpu" and (a is b or bool((a == b).all()))


def align(values):
    """Bring several scaled tensors to a common exponent: returns the raw tensors and the exponent (a
    tensor already at that exponent is returned as it is)."""
    if len(values) == 1:
        return [values[0].t], values[0].e
    e = values[0].e
    for v in values[1:]:
        e = torch.maximum(e, v.e)
    return [v.t if same_exponent(v.e, e) else v.t * pow2(v.e - e, v.t.dim()) for v in values], e


def total(terms) -> Scaled:
    """The renormalised sum of several scaled tensors (None terms are zero)."""
    raws, e = align([t for t in terms if t is not None])
    out = raws[0]
    for r in raws[1:]:
        out = out + r
    return renorm(Scaled(out, e))


def log2_total(x: Scaled) -> torch.Tensor:
    """``log2`` of the sum of each sample's entries (float64, shape ``(B,)``), as ``log2(m) + k + e`` with
    ``sum = m * 2**k``, ``m`` in ``[0.5, 1)``: the same ``log2(m)`` whatever power of two the tensor holds, so
    the result is exact under power-of-two rescaling."""
    m, k = torch.frexp(x.t.reshape(x.t.shape[0], -1).sum(1, dtype=torch.float64))
    return torch.log2(m) + (k.to(torch.float64) + x.e.to(torch.float64))


def raw(v):
    """The raw tensor(s) of a scaled value (a tuple of scaled values from chunk/split), else ``v``."""
    if isinstance(v, Scaled):
        return v.t
    if isinstance(v, tuple) and v and isinstance(v[0], Scaled):
        return tuple(x.t for x in v)
    return v


def detach(v):
    """A scaled value (or tuple of them) cut from the autograd graph; anything else as is."""
    if isinstance(v, Scaled):
        return v.detach()
    if isinstance(v, tuple) and v and isinstance(v[0], Scaled):
        return tuple(x.detach() for x in v)
    return v
