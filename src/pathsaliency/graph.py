"""From an ``nn.Module`` to a validated ReLU-DAG: capture, classify, fold.

Capture uses ``torch.fx.symbolic_trace`` rather than ``torch.export``: it needs no example data and
no compilation (about 15 ms for a ResNet-18, against seconds for export), it keeps ``nn.Module`` calls
as single nodes whose qualified names are the user's parameter names (which torch-pruning, NNCF and
``state_dict`` all speak), and its graph is small enough to interpret node by node with our own
semantics. Leaf modules are those of ``torch.nn`` (plus torchvision's ``FrozenBatchNorm2d``).

The model is traced through an *evaluation view*: a shallow copy of the module tree with
``training=False`` that shares every parameter and buffer. Branches on ``self.training`` therefore take
the inference path, and the user's model (flags, hooks, parameters) is never touched.

Every node of the graph that the selected output depends on is classified as

* the **input** (the first placeholder),
* **static**: shape queries (``size``, ``shape``) and constants, evaluated as plain Python at run time,
* an **affine step** (:mod:`pathsaliency.steps`): conv 1d/2d/3d, transposed conv, linear, or frozen
  batch-norm. A batch-norm whose only input is a conv/linear used by nothing else is *folded* into it
  (MATH.md section 1); any other batch-norm is a diagonal affine step of its own,
* a **fixed action** looked up in the registry of :mod:`pathsaliency.ops`,
* or **refused**: then :class:`UnsupportedModelError` lists every refused node with the reason (for a
  model that returns several tensors and no ``output=`` choice, every node that any output depends on).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from . import ops, steps
from .errors import UnsupportedModelError


class _Tracer(fx.Tracer):
    """``torch.fx`` tracing that treats torchvision's frozen batch-norm as a leaf and calls the
    ``forward`` of the other modules directly, so that no user hook (per-module or global) ever runs."""

    root_leaf = None  # a model that is itself a leaf module (a bare nn.Linear): its calls are named ''

    def call_module(self, m, forward, args, kwargs):
        return super().call_module(m, m.forward, args, kwargs)

    def path_of_module(self, mod):
        return "" if mod is self.root_leaf else super().path_of_module(mod)

    def is_leaf_module(self, m, qualname):
        if steps.FrozenBatchNorm2d is not None and isinstance(m, steps.FrozenBatchNorm2d):
            return True
        return super().is_leaf_module(m, qualname)


class _LeafRoot(nn.Module):
    """Calls a model that is itself a leaf module, so that the trace records one call of it (named '',
    its parameters keep their names: ``weight``, ``bias``) instead of tracing into its functional body."""

    def __init__(self, leaf):
        super().__init__()
        self.leaf = leaf

    def forward(self, x):
        return self.leaf(x)


def eval_view(module: nn.Module) -> nn.Module:
    """A shallow copy of the module tree in evaluation mode, sharing parameters and buffers (built
    without ``copy.copy``, which parametrized modules refuse)."""
    view = object.__new__(type(module))  # not type(module).__new__: GraphModule.__new__ makes a new class
    view.__dict__.update(module.__dict__)
    view.__dict__["_parameters"] = dict(module._parameters)
    view.__dict__["_buffers"] = dict(module._buffers)
    view.__dict__["_modules"] = {k: (eval_view(m) if m is not None else None) for k, m in module._modules.items()}
    view.__dict__["training"] = False
    return view


@dataclass
class Plan:
    """A validated ReLU-DAG: the live nodes in topological order and what each one does."""

    root: nn.Module  # the evaluation view (shares the user's tensors)
    graph: fx.Graph
    nodes: list  # live nodes in execution order, input first, output last
    input: fx.Node
    output: fx.Node
    static: set  # nodes evaluated as plain Python
    actions: dict  # node -> ops action (fixed nodes)
    affine: dict  # node -> steps.Step (the output node of each parameterised step)
    absorbed: set  # conv/linear nodes whose batch-norm was folded into them
    shared: dict = field(default_factory=dict)  # module name -> number of calls (> 1)
    producers: dict = field(default_factory=dict)  # module name -> list of steps that use it
    frees: dict = field(default_factory=dict)  # node -> nodes whose last reader it is
    consumers: dict = field(default_factory=dict)  # node -> non-static nodes that read it
    index: dict = field(default_factory=dict)  # node -> position in ``nodes``
    selector: object = None  # the ``output=`` choice of a model with several outputs

    def __post_init__(self):
        self.index = {n: i for i, n in enumerate(self.nodes)}
        for n in self.nodes:
            if n not in self.static:
                for a in self.inputs_of(n):
                    self.consumers.setdefault(a, []).append(n)
        last = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                last[a] = n
            if n in self.affine:
                last[self.affine[n].input] = n
        for a, n in last.items():
            if a is not self.output:
                self.frees.setdefault(n, []).append(a)

    @property
    def steps(self):
        return list(self.affine.values())

    def module_steps(self, name: str):
        return self.producers.get(name, [])

    def not_a_step(self, name: str) -> str:
        """Why the module ``name`` has no affine step in this plan, for errors."""
        try:
            mod = self.root.get_submodule(name)
        except AttributeError:
            return f"the model has no module named '{name}'"
        if not isinstance(mod, steps.AFFINE_MODULES):
            return f"'{name}' is a {type(mod).__name__}, not a conv, linear or batch-norm layer"
        called = any(n.op == "call_module" and n.target == name for n in self.graph.nodes)
        if called and self.selector is not None:
            return (f"'{name}' is not part of the graph of the selected output (output={self.selector!r}): it only "
                    "feeds other outputs of the model, so removing or changing it cannot change this one; "
                    "score it with the output it feeds")
        if called:
            return f"'{name}' is on no path to the model's output: the output does not depend on it"
        return f"'{name}' is not called in the model's forward pass"

    def inputs_of(self, n):
        return [self.affine[n].input] if n in self.affine else n.all_input_nodes

    def reachable_from(self, sources, through=None) -> set:
        """Every live node that depends on one of ``sources`` (the sources included); with ``through``,
        only along nodes for which ``through(node)`` is true."""
        sources = set(sources)
        reach = set()
        for n in self.nodes:
            if n in sources or ((through is None or through(n)) and any(a in reach for a in self.inputs_of(n))):
                reach.add(n)
        return reach


def capture(model: nn.Module, output=None) -> Plan:
    """Trace ``model`` and classify its graph (see the module docstring). Raises
    :class:`UnsupportedModelError` for a model that is not a ReLU-DAG."""
    view = eval_view(model)
    tracer = _Tracer()
    try:
        if tracer.is_leaf_module(view, ""):
            tracer.root_leaf = view
            graph = tracer.trace(_LeafRoot(view))
        else:
            graph = tracer.trace(view)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        raise UnsupportedModelError(
            [("<trace>", type(model).__name__, f"torch.fx could not trace the model ({type(exc).__name__}: {exc})")],
            header="the model could not be captured as a graph") from exc
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise UnsupportedModelError([("<input>", "placeholder", "the model takes no input")])
    inp = placeholders[0]
    out, choice = _select_output(graph, output)
    # without a choice among several outputs, classify what every output depends on: report it all at once
    live = _ancestors([out] if out is not None else choice[1])
    nodes = [n for n in graph.nodes if n in live]

    offenders = []
    for n in placeholders[1:]:
        if n in live and not n.args:
            offenders.append((n.name, "placeholder", "the model takes a second input without a default"))

    static, value = set(), {inp}
    for n in nodes:
        if n is inp:
            continue
        if n.op in ("placeholder", "get_attr") or not any(a in value for a in n.all_input_nodes):
            static.add(n)
        elif _is_shape_query(n):
            static.add(n)
        else:
            value.add(n)

    def is_value(a):
        return isinstance(a, fx.Node) and a in value

    actions, affine, absorbed, calls = {}, {}, set(), {}
    for n in nodes:
        if n not in value or n is inp or n.op == "output":
            continue
        if n.op == "call_module":
            mod = view.get_submodule(n.target)
            calls[n.target] = calls.get(n.target, 0) + 1
            if isinstance(mod, steps.AFFINE_MODULES):
                reason = _check_affine(n, mod, value)
                if reason:
                    offenders.append((n.name, ops.describe(n, view), reason))
                else:
                    affine[n] = steps.step_for(n, mod)
                continue
        action = ops.action_for(n, view, is_value)
        if isinstance(action, ops.Refusal):
            offenders.append((n.name, ops.describe(n, view), action.reason))
        else:
            actions[n] = action
    if out is not None and out not in value:
        offenders.append((out.name, "output", "the selected output does not depend on the input"))
    if choice is not None:
        offenders.insert(0, choice[0])
    if offenders:
        raise UnsupportedModelError(offenders)

    _fold_batchnorms(affine, absorbed, nodes, out)
    producers = {}
    for step in affine.values():
        for name in (step.module, step.bn):
            if name is not None:
                producers.setdefault(name, []).append(step)
    shared = {k: c for k, c in calls.items() if c > 1 and isinstance(view.get_submodule(k), steps.AFFINE_MODULES)}
    nodes = [n for n in nodes if n not in absorbed]
    return Plan(view, graph, nodes, inp, out, static, actions, affine, absorbed, shared, producers, selector=output)


def _select_output(graph, output):
    """``(the selected output node, None)``, or ``(None, (offender, every output node))`` for a model that
    returns several tensors and no ``output=`` choice."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    if output is not None:
        try:
            result = output(result) if callable(output) else result[output]
        except (KeyError, IndexError, TypeError) as exc:
            raise UnsupportedModelError([(out_node.name, "output", f"output selector {output!r} failed: {exc}")]) from exc
    if isinstance(result, fx.Node):
        return result, None
    kind = type(result).__name__
    keys = list(result.keys()) if isinstance(result, dict) else list(range(len(result))) if isinstance(result, (tuple, list)) else []
    leaves = []
    fx.node.map_arg(result, leaves.append)
    return None, ((out_node.name, "output", f"the model returns a {kind}; choose the tensor with output=<one of {keys}> "
                                             "(or a callable that picks it)"), leaves)


def _ancestors(nodes):
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _is_shape_query(n) -> bool:
    if n.op == "call_method" and n.target in ops.SHAPE_METHODS:
        return True
    return n.op == "call_function" and n.target is getattr and n.args[1] in ops.SHAPE_ATTRIBUTES


def _check_affine(n, mod, value):
    if len(n.args) != 1 or n.kwargs:
        return "called with extra arguments (e.g. output_size)"
    if isinstance(mod, steps.BATCHNORM_MODULES) and not isinstance(mod, steps.FrozenBatchNorm2d or ()):
        if mod.running_mean is None or mod.running_var is None:
            return "batch-norm without running statistics (track_running_stats=False) is not frozen"
    return None


def _fold_batchnorms(affine, absorbed, nodes, out):
    """Fold a batch-norm into the conv/linear that feeds it when nothing else reads that conv."""
    for n in nodes:
        step = affine.get(n)
        if not isinstance(step, steps.BatchNormStep):
            continue
        producer = affine.get(step.input)
        if producer is None or isinstance(producer, steps.BatchNormStep) or producer.bn is not None:
            continue
        if len(step.input.users) != 1 or step.input is out:
            continue
        absorbed.add(step.input)
        del affine[step.input]
        affine[n] = producer.folded(n, step.bn, step.eps)
