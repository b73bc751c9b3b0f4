"""The path-lifting passes: one interpreter of a :class:`~pathsaliency.graph.Plan`, three semantics.

:class:`Interpreter` has the shape of ``torch.fx.Interpreter``: ``initial_env`` gives the input's value,
one run loop walks ``plan.nodes`` and hands each node to the handler of its kind (``static``, ``affine``
step, ``fixed`` action), wraps any failure with the node and its operator, and drops every value after
its last reader. Activations are :class:`~pathsaliency.scaled.Scaled` tensors (``t * 2**e`` per sample).
The semantics are subclasses:

* :class:`NormPass`    -- ``||Phi(theta)||_1`` (or the ``l^q`` norm): absolute weights, ReLU as the
  identity, max-pool as a window sum, all-ones input. With ``retain`` it keeps the autograd graph so
  that saliencies can read ``d||Phi||/d|theta|`` and ``fwd(v) * bwd(v)``.
* :class:`CoupledPass` -- ``||Phi(theta)||_1 - ||Phi(theta'')||_1`` for ``|theta''| <= |theta|`` without
  cancellation: each value is the pair ``s`` (the ``theta''`` network) and ``d`` (``theta`` minus
  ``theta''``), ``d' = A d + (A - M) s + (b_A - b_M)``.
* :class:`RemovalPass` -- ``||Phi(theta)||_1 - ||Phi(theta with neurons removed)||_1`` for a batch of
  candidates (batch element ``j`` removes the neurons of candidate ``j``): the removed part ``d`` is
  propagated linearly and set to the full activation at every removed neuron; nodes that no removed
  neuron reaches are read from a cached norm pass instead of being recomputed, and the pass stops at
  the first node that carries all of ``d`` past the last removal (the loss is then ``<d, grad>``).

A partial stream (``d``) is linear and has no bias; ``None`` stands for zero in it.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from . import ops
from .errors import PathSaliencyError
from .scaled import Scaled, same_exponent, align, log2_total, pow2, raw, settle, total
from .steps import Weights

_NODE_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError)


class Interpreter:
    """Runs a plan node by node; subclasses define what a value is and what each kind of node does."""

    free = True  # drop each value after its last reader

    def __init__(self, plan, input_shape, *, dtype, device):
        self.plan, self.input_shape, self.dtype, self.device = plan, tuple(input_shape), dtype, device

    def run(self):
        plan = self.plan
        env = self.initial_env()
        for n in plan.nodes:
            if n in env:
                continue
            try:
                if n in plan.static:
                    env[n] = self.static(n, env)
                elif n in plan.affine:
                    env[n] = self.affine(plan.affine[n], env)
                else:
                    env[n] = self.fixed(n, plan.actions[n], env)
            except PathSaliencyError:
                raise
            except _NODE_ERRORS as exc:
                raise self._node_error(n, exc) from exc
            stop = self.after(n, env)
            if stop is not None:
                return stop
            if self.free:
                for a in plan.frees.get(n, ()):
                    env.pop(a, None)
        return self.result(env)

    # --- the handlers ---------------------------------------------------------------------------------

    def initial_env(self) -> dict:
        """``{input node: its value}``."""
        raise NotImplementedError

    def static(self, n, env):
        """Shape queries and constants: plain Python on the resolved arguments (activations are given as
        their raw tensors, whose shapes are those of the pass)."""
        root = self.plan.root
        if n.op == "placeholder":
            return n.args[0] if n.args else None
        if n.op == "get_attr":
            obj = root
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        resolve = lambda a: raw(self.shape_value(a, env))  # noqa: E731
        args, kwargs = fx.node.map_arg(n.args, resolve), fx.node.map_arg(n.kwargs, resolve)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            return root.get_submodule(n.target).forward(*args, **kwargs)
        raise PathSaliencyError(f"cannot evaluate static node '{n.name}'")

    def shape_value(self, a, env):
        """The value of ``a`` as a shape query reads it."""
        return env[a]

    def affine(self, step, env):
        raise NotImplementedError

    def fixed(self, n, action, env):
        raise NotImplementedError

    def after(self, n, env):
        """Called after each node; a non-None return ends the run with that result."""
        return None

    def result(self, env):
        raise NotImplementedError

    def ones(self) -> Scaled:
        """The all-ones input of one sample at scale ``2**0``."""
        ones = torch.ones((1,) + self.input_shape, dtype=self.dtype, device=self.device)
        return Scaled(ones, torch.zeros(1, dtype=self.dtype, device=self.device))

    def _node_error(self, node, exc):
        plan = self.plan
        what = ops.describe(node, plan.root)
        step = plan.affine.get(node)
        if step is not None and step.module and step.bn:
            what += f", folded into the {type(step.conv).__name__} '{step.module}' before it"
        return PathSaliencyError(f"node '{node.name}' ({what}) failed on an input of shape "
                                 f"{self.input_shape}: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------------------------------
# Operators on scaled values
# ----------------------------------------------------------------------------------------------------


def apply_fixed(action, args, kwargs, q, bias=True):
    """One fixed (non-parameterised) operator on scaled arguments, rescaled where needed
    (:func:`~pathsaliency.scaled.settle`); ``bias=False`` for a partial stream (no bias terms)."""
    leaves = []
    fx.node.map_aggregate((args, kwargs), lambda a: leaves.append(a) if isinstance(a, Scaled) else None)
    if action.combines:
        raws, e = align(leaves)
    else:
        raws, e = [v.t for v in leaves], leaves[0].e
    table = {id(v): r for v, r in zip(leaves, raws)}
    unwrap = lambda a: table[id(a)] if isinstance(a, Scaled) else a  # noqa: E731
    args, kwargs = fx.node.map_aggregate(args, unwrap), fx.node.map_aggregate(kwargs, unwrap)
    out = action.apply(args, kwargs, q)
    b = action.bias(args, out, q) if bias else None
    if b is not None:
        out = out + b * pow2(-e, out.dim())
    if isinstance(out, (tuple, list)):
        return tuple(Scaled(o, e) for o in out)
    if not action.renorms:
        return Scaled(out, e)
    return settle(Scaled(out, e))


def apply_affine(step, x: Scaled, wts: Weights) -> Scaled:
    """``W x + b`` of one step on a scaled activation (the bias enters at the activation's scale)."""
    y = step.linear(x.t, wts.w)
    if wts.b is not None:
        y = y + step.bias_view(wts.b, y.dim()) * pow2(-x.e, y.dim())
    return settle(Scaled(y, x.e))


def fixed_partial(action, n, part, full, num, static):
    """A fixed operator on a partial stream: ``part(a)`` is the partial value of input ``a`` (None for
    zero), ``full(a)`` the full one (for the shape of a zero). None when every input is zero."""
    if all(part(a) is None for a in n.all_input_nodes if a not in static):
        return None

    def zero(f):  # zero with the shape of the full value, as a broadcast view (no memory)
        if isinstance(f, tuple):
            return tuple(zero(x) for x in f)
        e = torch.full((num,), -1e4, dtype=f.e.dtype, device=f.e.device)  # below any real exponent
        return Scaled(f.t.new_zeros(()).expand(num, *f.t.shape[1:]), e)

    def sub(a):
        v = part(a)
        return zero(full(a)) if v is None else v

    return apply_fixed(action, fx.node.map_arg(n.args, sub), fx.node.map_arg(n.kwargs, sub), 1, bias=False)


# ----------------------------------------------------------------------------------------------------
# The three semantics
# ----------------------------------------------------------------------------------------------------


class NormPass(Interpreter):
    """The path-norm pass. ``weights``: step node -> :class:`Weights` (already ``|.|**q``).

    ``run()`` returns ``(log2 of the norm per sample, env)``; ``env`` maps each node to its scaled value
    (with ``keep=False`` values are dropped after their last use and ``env`` holds the output only).
    ``retain``: a dict that receives, for every node, its raw output tensor as a node of the autograd
    graph (for ``fwd(v) * bwd(v)`` and the chain rule)."""

    def __init__(self, plan, weights, input_shape, *, q=1, dtype, device, keep=True, retain=None):
        super().__init__(plan, input_shape, dtype=dtype, device=device)
        self.weights, self.q, self.free, self.retain = weights, q, not keep, retain

    def initial_env(self):
        return {self.plan.input: self.ones()}

    def affine(self, step, env):
        y = apply_affine(step, env[step.input], self.weights[step.node])
        if self.retain is not None and not y.t.requires_grad:
            y = Scaled(y.t.requires_grad_(True), y.e)
        return y

    def fixed(self, n, action, env):
        resolve = lambda a: env[a]  # noqa: E731
        return apply_fixed(action, fx.node.map_arg(n.args, resolve), fx.node.map_arg(n.kwargs, resolve), self.q)

    def after(self, n, env):
        v = env[n]
        if self.retain is not None and isinstance(v, Scaled) and v.t.requires_grad:
            self.retain[n] = v.t

    def result(self, env):
        return log2_total(env[self.plan.output]), env


class Pair:
    """The value of a node in a coupled pass: ``s`` in the small network, ``d`` (None: zero) the
    difference to the big one."""

    __slots__ = ("s", "d")

    def __init__(self, s, d):
        self.s, self.d = s, d


def _small(v):
    return v.s if isinstance(v, Pair) else v


def _diff(v):
    return v.d if isinstance(v, Pair) else v


class CoupledPass(Interpreter):
    """``run()``: ``log2`` of ``||Phi(big)||_1 - ||Phi(small)||_1`` and of ``||Phi(small)||_1`` for
    ``small <= big`` coordinatewise (both given as non-negative :class:`Weights` per step)."""

    def __init__(self, plan, big, small, input_shape, *, dtype, device):
        super().__init__(plan, input_shape, dtype=dtype, device=device)
        self.big, self.small = big, small

    def initial_env(self):
        return {self.plan.input: Pair(self.ones(), None)}  # the input is the same for both networks

    def shape_value(self, a, env):
        return _small(env[a])

    def affine(self, step, env):
        x = env[step.input]
        s, d = x.s, x.d
        a, m = self.big[step.node], self.small[step.node]
        dw = Weights(a.w - m.w, None if a.b is None else a.b - m.b)  # >= 0: small <= big
        terms = [Scaled(step.linear(s.t, dw.w), s.e)]
        if d is not None:
            terms.append(Scaled(step.linear(d.t, a.w), d.e))
        if dw.b is not None:
            shape = terms[0].t.shape
            terms.append(Scaled(step.bias_view(dw.b, len(shape)).expand(shape), torch.zeros_like(s.e)))
        return Pair(apply_affine(step, s, m), total(terms))

    def fixed(self, n, action, env):
        small = lambda a: _small(env[a])  # noqa: E731
        s = apply_fixed(action, fx.node.map_arg(n.args, small), fx.node.map_arg(n.kwargs, small), 1)
        d = fixed_partial(action, n, lambda a: _diff(env[a]), small, 1, self.plan.static)
        return Pair(s, d)

    def result(self, env):
        out = env[self.plan.output]
        log2_d = log2_total(out.d) if out.d is not None else torch.full((1,), -math.inf, dtype=torch.float64)
        return log2_d, log2_total(out.s)


class RemovalPass(Interpreter):
    """``run()``: ``log2`` of the path-norm lost when candidate ``j`` of ``num`` removes its neurons.

    ``cache``: node -> scaled value of a full norm pass with the same ``weights`` (batch 1).
    ``masks``: node -> bool tensor ``(num, C)``: channels of the node's output removed by candidate ``j``.
    ``in_masks``: affine node -> bool ``(num, C_in)``: input channels of that step removed by ``j``.
    ``grads``: node -> ``d(sum of the cached output) / d(cached value)``. Past the last removal the lost
    part ``d`` only flows through the unchanged linear network, so as soon as one node carries all of it
    (every path to the output crosses it) the loss is ``<d, grad>`` there and the pass stops early.
    """

    def __init__(self, plan, weights, cache, masks, in_masks, num, input_shape, *, dtype, device, grads=None):
        super().__init__(plan, input_shape, dtype=dtype, device=device)
        self.weights, self.cache, self.masks, self.in_masks, self.num = weights, cache, masks, in_masks, num
        self.grads = grads
        sources = set(masks) | set(in_masks)
        self.reach = plan.reachable_from(sources)
        self.last = max(plan.index[n] for n in sources)
        self.pending = {}  # nodes carrying part of ``d`` -> consumers not yet computed

    def initial_env(self):
        return {self.plan.input: None}

    def shape_value(self, a, env):
        v = env[a]
        if v is not None:
            return v
        full = self.cache[a]  # not recomputed: the cached value, for every candidate
        return full.expand(self.num) if isinstance(full, Scaled) else full

    def affine(self, step, env):
        n = step.node
        if n not in self.reach:
            return None
        d = env[step.input]
        if n in self.in_masks:
            d = self._inject(d, self.cache[step.input], self.in_masks[n], step.channel_dim)
        if d is not None:
            w = self.weights[n].w
            x = d.t
            if x.dim() == 4 and w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)  # the weights' layout (a no-op if it is)
            d = settle(Scaled(step.linear(x, w), d.e))
        if n in self.masks:  # d is this step's own fresh output: written in place
            d = self._inject(d, self.cache[n], self.masks[n], step.channel_dim, owned=True)
        return d

    def fixed(self, n, action, env):
        if n not in self.reach:
            return None
        d = fixed_partial(action, n, lambda a: env[a], lambda a: self.cache[a], self.num, self.plan.static)
        if n in self.masks:
            d = self._inject(d, self.cache[n], self.masks[n], 1)
        return d

    def after(self, n, env):
        plan, pending = self.plan, self.pending
        if n in plan.static:
            return None
        d = env[n]
        for a in plan.inputs_of(n):
            if a in pending:
                pending[a] -= 1
                if not pending[a]:
                    del pending[a]
        if d is not None and plan.consumers.get(n):
            pending[n] = len(plan.consumers[n])
        if (self.grads is not None and plan.index[n] >= self.last and n in self.grads and isinstance(d, Scaled)
                and list(pending) == [n]):
            return self._log2_through(d, self.cache[n], self.grads[n], self.cache[plan.output])
        return None

    def result(self, env):
        out = env[self.plan.output]
        if out is None:
            return torch.full((self.num,), -math.inf, dtype=torch.float64)
        return log2_total(out.expand(self.num))

    def _log2_through(self, d: Scaled, full: Scaled, grad, out: Scaled):
        """``log2`` of what ``d`` at a node contributes to the output, by the chain rule: ``<d, grad>``.

        ``grad`` is the derivative of the cached output's raw sum by the node's raw cached value, so the
        true loss is ``<d_raw, grad> * 2**(e_d - e_node + e_out)``."""
        num = self.num
        d = d.expand(num)
        dot = (d.t * grad.to(torch.float64)).sum(tuple(range(1, d.t.dim())))  # float64 products, one kernel
        e = d.e.to(torch.float64) - full.e.to(torch.float64) + out.e.to(torch.float64)
        return torch.log2(dot) + e

    def _inject(self, d, full: Scaled, mask, dim, owned=False):
        """At removed channels the whole activation is lost: ``d[j, c] = full[c]`` where ``mask[j, c]``.

        ``owned``: ``d`` is a fresh tensor no other node reads, so only the removed channels are written
        (in place, at ``d``'s exponent, which is at least ``full``'s); otherwise a ``where`` over the
        whole value."""
        num, ndim = self.num, full.t.dim()
        dim = dim % ndim
        if owned:
            if d is None:
                fmt = torch.channels_last if ndim == 4 and full.t.device.type == "cpu" else torch.contiguous_format
                zeros = torch.empty((num,) + tuple(full.t.shape[1:]), dtype=full.t.dtype, device=full.t.device,
                                    memory_format=fmt).zero_()
                d = Scaled(zeros, full.e.expand(num))
            e = torch.maximum(d.e, full.e)
            dt = d.t if same_exponent(d.e, e) else d.t * pow2(d.e - e, ndim)
            j, c = mask.nonzero(as_tuple=True)
            vals = full.t[0].movedim(dim - 1, 0)[c]  # (removed pairs, the rest of one channel)
            vals = vals * torch.exp2(full.e[0] - e[j]).view((-1,) + (1,) * (vals.dim() - 1))
            dt.movedim(dim, 1)[j, c] = vals
            return settle(Scaled(dt, e))
        shape = [num] + [1] * (ndim - 1)
        shape[dim] = mask.shape[1]
        m = mask.view(shape)
        if d is None:
            return settle(Scaled(torch.where(m, full.t, full.t.new_zeros(())), full.e.expand(num)))
        (dt, ft), e = align([d, full])
        if dt.dim() == 4 and dt.is_contiguous(memory_format=torch.channels_last):
            ft = ft.contiguous(memory_format=torch.channels_last)  # one layout: a fast elementwise kernel
        return settle(Scaled(torch.where(m, ft, dt), e))


def norm_pass(plan, weights, input_shape, **kw):
    """:class:`NormPass` run: ``(log2 of the norm per sample, env)``."""
    return NormPass(plan, weights, input_shape, **kw).run()


def coupled_pass(plan, big, small, input_shape, **kw):
    """:class:`CoupledPass` run: ``(log2 of ||Phi(big)|| - ||Phi(small)||, log2 of ||Phi(small)||)``."""
    return CoupledPass(plan, big, small, input_shape, **kw).run()


def removal_pass(plan, weights, cache, masks, in_masks, num, input_shape, **kw):
    """:class:`RemovalPass` run: ``log2`` of the path-norm lost by each of ``num`` candidates."""
    return RemovalPass(plan, weights, cache, masks, in_masks, num, input_shape, **kw).run()
