"""The errors pathsaliency raises instead of returning a wrong number."""
from __future__ import annotations

import re


class PathSaliencyError(ValueError):
    """Base class: the input cannot be turned into a correct path-lifting computation."""


class UnsupportedModelError(PathSaliencyError):
    """The model is not a ReLU-DAG (MATH.md section 1); ``offenders`` lists every offending graph node
    as ``(node name, operator, reason)``. The message groups them by operator and reason, naming the
    first ``SHOWN`` nodes of each group."""

    SHOWN = 3

    def __init__(self, offenders, header="the model is not a ReLU-DAG"):
        self.offenders = list(offenders)
        groups = {}
        for name, op, reason in self.offenders:
            kind = re.sub(r" '[^']*'$", "", op)  # "SiLU module 'features.1'" -> "SiLU module"
            groups.setdefault((kind, reason), []).append((name, op))
        lines = [f"{header}; {len(self.offenders)} unsupported node(s):"]
        for (kind, reason), nodes in groups.items():
            shown = ", ".join(f"node '{name}' ({op})" for name, op in nodes[:self.SHOWN])
            more = f" and {len(nodes) - self.SHOWN} more" if len(nodes) > self.SHOWN else ""
            count = f"{len(nodes)} x " if len(nodes) > 1 else ""
            lines.append(f"  - {count}{kind}: {reason}: {shown}{more}")
        super().__init__("\n".join(lines))


class ArchitectureMismatchError(PathSaliencyError):
    """Two parameter vectors that are supposed to share an architecture do not."""
