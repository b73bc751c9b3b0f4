"""``check_bound``: the observed output deviation never exceeds its certified bound (MATH.md section 3).

For every sample ``i``: ``observed_i <= bound_i * (1 + REL_TOL) + allowance_i``. ``observed_i`` is
``||R_theta(x_i) - R_theta'(x_i)||_1`` evaluated in floating point, ``bound_i = max(1, ||x_i||_inf) * D``.
The only slack is float rounding: ``REL_TOL`` of the bound (the bound itself is rounded), plus
``allowance_i = ABS_TOL_EPS * eps * (||R_theta(x_i)||_1 + ||R_theta'(x_i)||_1)`` with ``eps`` the machine
epsilon of the outputs' dtype (:func:`rounding_allowance`): the rounding of the two evaluations being
subtracted. A sample beyond it is a bug, raised as :class:`CertificateViolation`, never reported.
"""
from __future__ import annotations

import torch

from .errors import PathSaliencyError

__all__ = ["CertificateViolation", "check_bound", "rounding_allowance", "REL_TOL", "ABS_TOL_EPS"]

REL_TOL = 1e-6
ABS_TOL_EPS = 64


class CertificateViolation(PathSaliencyError, AssertionError):
    """An observed deviation exceeds its certified bound: a bug in pathsaliency (or in the effective
    weights handed to it), never a property of the model. No result is produced."""


def rounding_allowance(ref_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per sample, ``ABS_TOL_EPS * eps * (||ref_out||_1 + ||out||_1)`` (float64, on the CPU)."""
    eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
    n = ref_out.shape[0]
    mag = ref_out.double().reshape(n, -1).abs().sum(1) + out.double().reshape(n, -1).abs().sum(1)
    return (ABS_TOL_EPS * eps * mag).cpu()


def check_bound(observed: torch.Tensor, bound: torch.Tensor, allowance=None, *, what: str = "the compressed model",
                detail: str = "") -> None:
    """Raise :class:`CertificateViolation` unless ``observed <= bound * (1 + REL_TOL) + allowance`` for every
    sample (``allowance``: :func:`rounding_allowance`, or 0)."""
    observed, bound = observed.double().cpu(), bound.double().cpu()
    allowed = bound * (1.0 + REL_TOL) + (0.0 if allowance is None else allowance.double().cpu())
    bad = observed > allowed
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise CertificateViolation(
            f"BUG: the observed deviation of {what} exceeds its certified bound on {int(bad.sum())} of "
            f"{observed.numel()} samples (first: sample {i}, observed {float(observed[i]):.9g} > "
            f"max(1, ||x||_inf) * D = {float(bound[i]):.9g}{detail}). MATH.md section 3 says this cannot happen: "
            "the path-metric computation (or the effective weights given) is wrong; please report this with "
            "the models.")
