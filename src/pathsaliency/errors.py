"""The errors pathsaliency raises instead of returning a wrong number."""
from __future__ import annotations


class PathSaliencyError(ValueError):
    """Base class: the input cannot be turned into a correct path-lifting computation."""


class UnsupportedModelError(PathSaliencyError):
    """The model is not a ReLU-DAG (MATH.md section 1); lists every offending graph node."""

    def __init__(self, offenders, header="the model is not a ReLU-DAG"):
        self.offenders = list(offenders)  # (node name, operator, reason)
        lines = [f"{header}; {len(self.offenders)} unsupported node(s):"]
        lines += [f"  - node '{name}' ({op}): {reason}" for name, op, reason in self.offenders]
        super().__init__("\n".join(lines))


class ArchitectureMismatchError(PathSaliencyError):
    """Two parameter vectors that are supposed to share an architecture do not."""
