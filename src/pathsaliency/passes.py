"""The path-lifting passes: one interpreter, three semantics.

Every activation of a pass is a :class:`Scaled` tensor ``t * 2**e`` with a per-sample exponent ``e``:
after each operator the tensor is divided by the power of two nearest above its maximum and ``e`` keeps
the count (MATH.md section 5). Powers of two make the rescaling exact, so nothing overflows and rescaling
invariance stays bit-exact. All tensors of a pass are non-negative; nothing is ever subtracted.

* :func:`norm_pass`    -- ``||Phi(theta)||_1`` (or the ``l^q`` norm): absolute weights, ReLU as the
  identity, max-pool as a window sum, all-ones input. With ``grad=True`` it keeps the autograd graph so
  that saliencies can read ``d||Phi||/d|theta|`` and ``fwd(v) * bwd(v)``.
* :func:`coupled_pass` -- ``||Phi(theta)||_1 - ||Phi(theta'')||_1`` for ``|theta''| <= |theta|`` without
  cancellation: it propagates ``s`` (the ``theta''`` network) and ``d`` (``theta`` minus ``theta''``),
  ``d' = A d + (A - M) s + (b_A - b_M)``.
* :func:`removal_pass` -- ``||Phi(theta)||_1 - ||Phi(theta with neurons removed)||_1`` for a batch of
  candidates (batch element ``j`` removes the neurons of candidate ``j``): the removed part ``d`` is
  propagated linearly and set to the full activation at every removed neuron; nodes that no removed
  neuron reaches are read from a cached norm pass instead of being recomputed.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import ops
from .errors import PathSaliencyError


class Scaled:
    """``t * 2**e``: ``t`` of shape ``(B, ...)``, ``e`` of shape ``(B,)`` (integer-valued floats).

    Deliberately not a tuple, so that ``torch.fx`` argument mapping treats it as one leaf."""

    __slots__ = ("t", "e")

    def __init__(self, t: torch.Tensor, e: torch.Tensor):
        self.t, self.e = t, e


def _pow2(k, ndim):
    return torch.exp2(k).view((-1,) + (1,) * (ndim - 1))


def renorm(x: Scaled) -> Scaled:
    """Divide each sample by the power of two just above its maximum (exact), count it in ``e``."""
    t = x.t
    m = t.detach().reshape(t.shape[0], -1).amax(1) if t.dim() > 1 else t.detach()
    _, k = torch.frexp(m)
    k = k.to(t.dtype)
    return Scaled(t * _pow2(-k, t.dim()), x.e + k)


def align(values):
    """Bring several scaled tensors to a common exponent: returns the raw tensors and the exponent."""
    if len(values) == 1:
        return [values[0].t], values[0].e
    e = values[0].e
    for v in values[1:]:
        e = torch.maximum(e, v.e)
    return [v.t * _pow2(v.e - e, v.t.dim()) for v in values], e


def log2_total(x: Scaled) -> torch.Tensor:
    """``log2`` of the sum of each sample's entries (float64, shape ``(B,)``)."""
    s = x.t.reshape(x.t.shape[0], -1).sum(1, dtype=torch.float64)
    return torch.log2(s) + x.e.to(torch.float64)


def _is_scaled(v):
    return isinstance(v, Scaled)


def _leaves(args):
    out = []
    fx.node.map_aggregate(args, lambda a: out.append(a) if _is_scaled(a) else None)
    return out


def apply_fixed(action, args, kwargs, q, bias=True):
    """One fixed (non-parameterised) operator on scaled arguments."""
    if isinstance(action, ops.Same) and action.fn is operator.getitem and isinstance(args[0], (tuple, list)):
        return args[0][args[1]]  # selecting one output of chunk/split
    if isinstance(action, ops.Identity):
        return args[0]
    leaves = _leaves((args, kwargs))
    if action.combines:
        raws, e = align(leaves)
        table = {id(v): r for v, r in zip(leaves, raws)}
    else:
        e = leaves[0].e
        table = {id(v): v.t for v in leaves}
    raw = lambda a: table[id(a)] if _is_scaled(a) else a  # noqa: E731
    out = action(fx.node.map_aggregate(args, raw), fx.node.map_aggregate(kwargs, raw), q)
    if isinstance(action, ops.Bias) and bias:
        b = action.bias(fx.node.map_aggregate(args, raw), out, q)
        out = out + b * _pow2(-e, out.dim())
    if isinstance(out, (tuple, list)):
        return tuple(Scaled(o, e) for o in out)
    if isinstance(action, ops.Same) and not (action.combines or action.grows):
        return Scaled(out, e)  # a fixed map that cannot grow values (reshape, slice, pad, average): no rescale
    return renorm(Scaled(out, e))


def eval_static(node, env, root):
    """Shape queries and constants: plain Python on the resolved arguments (activations are given as
    their raw tensors, whose shapes are those of the pass)."""
    def resolve(a):
        v = env[a]
        if isinstance(v, Scaled):
            return v.t
        if isinstance(v, tuple) and v and isinstance(v[0], Scaled):
            return tuple(x.t for x in v)
        return v

    if node.op == "placeholder":
        return node.args[0] if node.args else None
    if node.op == "get_attr":
        obj = root
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    args = fx.node.map_arg(node.args, resolve)
    kwargs = fx.node.map_arg(node.kwargs, resolve)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return root.get_submodule(node.target).forward(*args, **kwargs)
    raise PathSaliencyError(f"cannot evaluate static node '{node.name}'")


def _node_error(node, plan, exc, input_shape):
    what = ops.describe(node, plan.root)
    step = plan.affine.get(node)
    if step is not None and step.module and step.bn:
        what += f", folded into the {type(step.conv).__name__} '{step.module}' before it"
    return PathSaliencyError(
        f"node '{node.name}' ({what}) failed on an input of shape "
        f"{tuple(input_shape)}: {type(exc).__name__}: {exc}")


@dataclass
class Weights:
    """The non-negative weights of one affine step for one pass."""

    w: torch.Tensor
    b: torch.Tensor | None


def _affine(step, x: Scaled, wts: Weights) -> Scaled:
    y = step.linear(x.t, wts.w)
    if wts.b is not None:
        y = y + step.bias_view(wts.b, y.dim()) * _pow2(-x.e, y.dim())
    return renorm(Scaled(y, x.e))


def _sum_scaled(terms):
    terms = [t for t in terms if t is not None]
    raws, e = align(terms)
    out = raws[0]
    for r in raws[1:]:
        out = out + r
    return renorm(Scaled(out, e))


def norm_pass(plan, weights, input_shape, *, q=1, dtype, device, keep=True, retain=None):
    """The path-norm pass. ``weights``: step node -> :class:`Weights` (already ``|.|**q``).

    Returns ``(log2 of the norm per sample, env)``; ``env`` maps each node to its scaled value (with
    ``keep=False`` values are dropped after their last use and ``env`` holds the output only).
    ``retain``: a dict that receives, for every node, its raw output tensor as a node of the autograd
    graph (for ``fwd(v) * bwd(v)`` and the chain rule).
    """
    ones = torch.ones((1,) + tuple(input_shape), dtype=dtype, device=device)
    env = {}
    for n in plan.nodes:
        try:
            if n is plan.input:
                env[n] = Scaled(ones, torch.zeros(1, dtype=dtype, device=device))
            elif n in plan.static:
                env[n] = eval_static(n, env, plan.root)
            elif n in plan.affine:
                step = plan.affine[n]
                y = _affine(step, env[step.input], weights[n])
                if retain is not None and not y.t.requires_grad:
                    y = Scaled(y.t.requires_grad_(True), y.e)
                env[n] = y
            else:
                env[n] = apply_fixed(plan.actions[n], _resolve(n.args, env), _resolve(n.kwargs, env), q)
            if retain is not None and isinstance(env[n], Scaled) and env[n].t.requires_grad:
                retain[n] = env[n].t
            if not keep:
                for a in plan.frees.get(n, ()):
                    env.pop(a, None)
        except PathSaliencyError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError) as exc:
            raise _node_error(n, plan, exc, input_shape) from exc
    out = env[plan.output]
    return log2_total(out), env


def _resolve(args, env):
    return fx.node.map_arg(args, lambda a: env[a])


def coupled_pass(plan, big, small, input_shape, *, dtype, device):
    """``log2`` of ``||Phi(big)||_1 - ||Phi(small)||_1`` and of ``||Phi(small)||_1`` for
    ``small <= big`` coordinatewise (both given as non-negative :class:`Weights` per step)."""
    ones = torch.ones((1,) + tuple(input_shape), dtype=dtype, device=device)
    zero_e = torch.zeros(1, dtype=dtype, device=device)
    s_env, d_env = {}, {}
    for n in plan.nodes:
        try:
            if n is plan.input:
                s_env[n] = Scaled(ones, zero_e)
                d_env[n] = None  # the input is the same for both networks
            elif n in plan.static:
                s_env[n] = d_env[n] = eval_static(n, s_env, plan.root)
            elif n in plan.affine:
                step = plan.affine[n]
                s, d = s_env[step.input], d_env[step.input]
                a, m = big[n], small[n]
                s_env[n] = _affine(step, s, m)
                dw = Weights(a.w - m.w, None if a.b is None else a.b - m.b)  # >= 0: small <= big
                terms = [Scaled(step.linear(s.t, dw.w), s.e)]
                if d is not None:
                    terms.append(Scaled(step.linear(d.t, a.w), d.e))
                if dw.b is not None:
                    shape = terms[0].t.shape
                    terms.append(Scaled(step.bias_view(dw.b, len(shape)).expand(shape), zero_e))
                d_env[n] = _sum_scaled(terms)
            else:
                action = plan.actions[n]
                s_env[n] = apply_fixed(action, _resolve(n.args, s_env), _resolve(n.kwargs, s_env), 1)
                d_env[n] = _fixed_partial(action, n, d_env, s_env, 1, plan.static)
        except PathSaliencyError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError) as exc:
            raise _node_error(n, plan, exc, input_shape) from exc
    d, s = d_env[plan.output], s_env[plan.output]
    log2_d = log2_total(d) if d is not None else torch.full((1,), -math.inf, dtype=torch.float64)
    return log2_d, log2_total(s)


def _batched(v, full, num):
    """The value of a node in a batched partial pass, for shape queries: ``full`` expanded if absent."""
    if v is not None:
        return v
    if isinstance(full, Scaled):
        return Scaled(full.t.expand(num, *full.t.shape[1:]), full.e.expand(num))
    return full


def _fixed_partial(action, n, part_env, full_env, num, static):
    """A fixed operator on a partial stream (``d``) in which ``None`` stands for zero: linear, no bias."""
    if all(part_env[a] is None for a in n.all_input_nodes if a not in static):
        return None

    def zero(f):  # zero with the shape of the full value, as a broadcast view (no memory)
        if isinstance(f, tuple):
            return tuple(zero(x) for x in f)
        e = torch.full((num,), -1e4, dtype=f.e.dtype, device=f.e.device)  # below any real exponent
        return Scaled(f.t.new_zeros(()).expand(num, *f.t.shape[1:]), e)

    def sub(a):
        v = part_env[a]
        return zero(full_env[a]) if v is None else v

    return apply_fixed(action, fx.node.map_arg(n.args, sub), fx.node.map_arg(n.kwargs, sub), 1, bias=False)


def removal_pass(plan, weights, cache, masks, in_masks, num, input_shape, *, dtype, device, grads=None):
    """``log2`` of the path-norm lost when candidate ``j`` of ``num`` removes its neurons.

    ``cache``: node -> scaled value of a full norm pass with the same ``weights`` (batch 1).
    ``masks``: node -> bool tensor ``(num, C)``: channels of the node's output removed by candidate ``j``.
    ``in_masks``: affine node -> bool ``(num, C_in)``: input channels of that step removed by ``j``.
    ``grads``: node -> ``d(sum of the cached output) / d(cached value)``. Past the last removal the lost
    part ``d`` only flows through the unchanged linear network, so as soon as one node carries all of it
    (every path to the output crosses it) the loss is ``<d, grad>`` there and the pass stops early.
    """
    sources = set(masks) | set(in_masks)
    reach = plan.reachable_from(sources)
    last = max(plan.index[n] for n in sources)
    pending = {}  # nodes carrying part of ``d`` -> consumers not yet computed
    env = {}
    for n in plan.nodes:
        if n in plan.static:
            env[n] = eval_static(n, {a: _batched(env[a], cache[a], num) for a in n.all_input_nodes}, plan.root)
            continue
        if n not in reach or n is plan.input:
            env[n] = None
            continue
        if n in plan.affine:
            step = plan.affine[n]
            d = env[step.input]
            if n in in_masks:
                d = _inject(d, cache[step.input], in_masks[n], step.channel_dim, num)
            d = None if d is None else renorm(Scaled(step.linear(d.t, weights[n].w), d.e))
        else:
            d = _fixed_partial(plan.actions[n], n, env, cache, num, plan.static)
        if n in masks:
            d = _inject(d, cache[n], masks[n], plan.affine[n].channel_dim if n in plan.affine else 1, num)
        env[n] = d
        for a in plan.inputs_of(n):
            if a in pending:
                pending[a] -= 1
                if not pending[a]:
                    del pending[a]
        if d is not None and plan.consumers.get(n):
            pending[n] = len(plan.consumers[n])
        if grads is not None and plan.index[n] >= last and n in grads and isinstance(d, Scaled) and list(pending) == [n]:
            return _log2_through(d, cache[n], grads[n], cache[plan.output], num)
    out = env[plan.output]
    if out is None:
        return torch.full((num,), -math.inf, dtype=torch.float64)
    if out.t.shape[0] != num:
        out = Scaled(out.t.expand(num, *out.t.shape[1:]), out.e.expand(num))
    return log2_total(out)


def _log2_through(d: Scaled, full: Scaled, grad, out: Scaled, num):
    """``log2`` of what ``d`` at a node contributes to the output, by the chain rule: ``<d, grad>``.

    ``grad`` is the derivative of the cached output's raw sum by the node's raw cached value, so the
    true loss is ``<d_raw, grad> * 2**(e_d - e_node + e_out)``."""
    dt = d.t.expand(num, *d.t.shape[1:]) if d.t.shape[0] != num else d.t
    dot = (dt.to(torch.float64) * grad.to(torch.float64)).reshape(num, -1).sum(1)
    e = d.e.to(torch.float64).expand(num) - full.e.to(torch.float64) + out.e.to(torch.float64)
    return torch.log2(dot) + e


def _inject(d, full: Scaled, mask, dim, num):
    """At removed channels the whole activation is lost: ``d[j, c] = full[c]`` where ``mask[j, c]``."""
    ndim = full.t.dim()
    dim = dim % ndim
    shape = [num] + [1] * (ndim - 1)
    shape[dim] = mask.shape[1]
    m = mask.view(shape)
    if d is None:
        d = Scaled(full.t.new_zeros(()).expand(num, *full.t.shape[1:]), full.e.expand(num))
    (dt, ft), e = align([d, full])
    return renorm(Scaled(torch.where(m, ft.expand_as(dt) if ft.shape[0] != dt.shape[0] else ft, dt), e))
