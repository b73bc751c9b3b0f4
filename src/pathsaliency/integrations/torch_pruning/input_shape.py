"""The shape of one input sample, read from a torch-pruning dependency graph's trace."""
from __future__ import annotations

from pathsaliency.lifting import lift

from ._compat import module_names, saved_input
from .groups import LAYERS

__all__ = ["input_shape_from_graph"]


def input_shape_from_graph(DG, output=None):
    """The shape of one input sample, read from the dependency graph's trace, or None.

    ``tp.DependencyGraph`` does not keep its ``example_inputs``, but its nodes keep the autograd nodes of
    the traced forward pass, and the conv / linear / batch-norm layers without an input node saved the
    tensor they read. That tensor is the model input only when the model feeds its input straight into
    the layer; this is checked on the model's captured graph (otherwise: None). The batch dimension is
    dropped. None as well when no such layer exists or they disagree.
    """
    try:
        plan = lift(DG.model, output).plan
    except Exception:  # the model is not supported: channel_saliency will say why
        return None
    direct = set()
    for step in plan.steps:
        if step.input is plan.input:
            direct.update(n for n in (step.module, step.bn) if n is not None)
    names = module_names(DG)
    shapes = set()
    for m, node in DG.module2node.items():
        if node.inputs or not isinstance(m, LAYERS):
            continue
        if names.get(m) not in direct:
            return None
        t = saved_input(node.grad_fn)
        if t is None or t.dim() < 2:
            return None
        shapes.add(tuple(t.shape[1:]))
    return shapes.pop() if len(shapes) == 1 else None
