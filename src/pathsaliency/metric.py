"""``path_metric`` and ``lipschitz_bound``: the certified distance of MATH.md sections 3 and 4.

With ``a = |theta|``, ``b = |theta'|`` and ``theta''`` the signed ``min(a, b)`` (zero where the signs
differ), ``D = ||Phi(theta)||_1 + ||Phi(theta')||_1 - 2 ||Phi(theta'')||_1`` is computed as
``(||Phi(theta)|| - ||Phi(theta'')||) + (||Phi(theta')|| - ||Phi(theta'')||)`` by two coupled passes, so
that nothing cancels. When ``theta'`` is dominated by ``theta`` (pruning: weights zeroed or shrunk with the
same signs) ``theta'' = theta'`` and ``D = ||Phi(theta)|| - ||Phi(theta')||`` exactly, in one pass.
For every input ``x``: ``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lifting import check_same_architecture, compute_dtype, lift
from .norm import PathValue
from .evaluate import input_bounds
from .interpreter import coupled_pass
from .precision import ieee_float32
from .steps import Weights
from .theta import Theta


@dataclass(frozen=True, repr=False)
class PathMetric(PathValue):
    """The certified distance ``D(theta, theta')``.

    ``exact``: True when one parameter vector dominates the other (then ``D`` is exactly
    ``||Phi(theta) - Phi(theta')||_1``); otherwise ``D`` is the certified upper bound of case 2.
    ``log2_norm``: ``log2 ||Phi(theta)||_1`` of the reference, so ``relative = D / ||Phi(theta)||_1``.
    """

    exact: bool = False
    log2_norm: float = -math.inf

    @property
    def relative(self) -> float:
        if self.log2 == -math.inf:
            return 0.0
        return 2.0 ** (self.log2 - self.log2_norm)

    @property
    def norm(self) -> PathValue:
        return PathValue(self.log2_norm)

    def __repr__(self) -> str:
        return (f"PathMetric(log10={self.log10:.6g}, value={self.value:.6g}, exact={self.exact}, "
                f"relative={self.relative:.3g})")


def _log2_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log2(1.0 + 2.0 ** (lo - hi))


def _dominates(big: dict, small: dict) -> bool:
    """``|small| <= |big|`` coordinatewise with compatible signs, for every step (read back once)."""
    ok = []
    for node, (w, b) in big.items():
        w2, b2 = small[node]
        for x, y in ((w, w2), (b, b2)):
            if x is None and y is None:
                continue
            x = torch.zeros_like(y) if x is None else x
            y = torch.zeros_like(x) if y is None else y
            ok.append(((y.abs() <= x.abs()) & (x * y >= 0)).all())
    return bool(torch.stack(ok).all()) if ok else True


def _min_weights(p: dict, r: dict) -> dict:
    """theta'' of MATH.md section 4: ``min(|theta|, |theta'|)``, zero where the signs differ."""
    out = {}
    for node, (w, b) in p.items():
        w2, b2 = r[node]
        out[node] = Weights(_min(w, w2), _min(b, b2))
    return out


def _min(x, y):
    if x is None and y is None:
        return None
    x = torch.zeros_like(y) if x is None else x
    y = torch.zeros_like(x) if y is None else y
    return torch.where(x * y > 0, torch.minimum(x.abs(), y.abs()), torch.zeros_like(x))


def _filled(ws: dict, like: dict) -> dict:
    """Give a missing bias the zero bias of the other parameter vector."""
    out = {}
    for node, w in ws.items():
        other_b = like[node].b
        out[node] = Weights(w.w, w.b if w.b is not None or other_b is None else torch.zeros_like(other_b))
    return out


@ieee_float32()
def path_metric(model, other, input_shape, *, output=None, dtype=torch.float64) -> PathMetric:
    """The certified l1 path-metric ``D(theta, theta')`` between ``model`` and ``other``.

    ``other`` has the same architecture: an ``nn.Module`` (a pruned copy with zeros, a quantized copy with
    dequantized weights, a fine-tuned copy), a state dict of its parameters and buffers, or a
    :class:`~pathsaliency.Theta` (what an integration's ``effective_theta`` returns); ``model`` is an
    ``nn.Module`` or a ``Theta``. Neither model is modified. ``dtype`` is float64 by default: this is a
    certificate.
    """
    dtype = compute_dtype(dtype)
    lifted, model = _lifted_pair(model, other, output)
    shape = lifted.sample_shape(input_shape)
    dev = lifted.device
    with torch.no_grad():
        p, r = _signed(lifted, model, dtype, "reference model"), _signed(lifted, other, dtype, "other model")
        if _dominates(p, r):
            a, b = _abs_all(p), _abs_all(r)
            log2_d, log2_small = coupled_pass(lifted.plan, a, _filled(b, a), shape, dtype=dtype, device=dev)
            return PathMetric(float(log2_d[0]), True, _log2_add(float(log2_d[0]), float(log2_small[0])))
        if _dominates(r, p):
            a, b = _abs_all(r), _abs_all(p)
            log2_d, log2_small = coupled_pass(lifted.plan, a, _filled(b, a), shape, dtype=dtype, device=dev)
            return PathMetric(float(log2_d[0]), True, float(log2_small[0]))
        m = _min_weights(p, r)
        a, b = _abs_all(p), _abs_all(r)
        d1, s1 = coupled_pass(lifted.plan, _filled(a, m), m, shape, dtype=dtype, device=dev)
        d2, _ = coupled_pass(lifted.plan, _filled(b, m), m, shape, dtype=dtype, device=dev)
        log2_d = _log2_add(float(d1[0]), float(d2[0]))
        return PathMetric(log2_d, False, _log2_add(float(d1[0]), float(s1[0])))


def _lifted_pair(model, other, output):
    """The lifted reference architecture of ``model`` (a module or a Theta), checked against ``other``'s."""
    ref = model.reference if isinstance(model, Theta) else model
    lifted = lift(ref, output)
    check_same_architecture(ref, lifted, other.reference if isinstance(other, Theta) else other, output)
    return lifted, model


def _signed(lifted, source, dtype, what) -> dict:
    """node -> signed ``(W, b)`` of ``source``: a module, a state dict or a Theta (``what`` names it in errors)."""
    if isinstance(source, Theta):
        return source.signed(lifted.plan, dtype, lifted.device)
    return lifted.signed(source, dtype, what)


def _abs_all(p: dict) -> dict:
    return {node: Weights.absolute(w, b) for node, (w, b) in p.items()}


def lipschitz_bound(model, other, x, *, output=None, dtype=torch.float64) -> torch.Tensor:
    """The certified bound on ``||R_model(x_i) - R_other(x_i)||_1`` for each sample of the batch ``x``:
    ``max(1, ||x_i||_inf) * D(model, other)`` (float64 tensor of shape ``(B,)``; ``inf`` only where the
    bound exceeds float64)."""
    if not torch.is_tensor(x) or x.dim() < 1:
        raise ValueError("x must be a batch of inputs (a tensor whose first dimension is the batch)")
    d = path_metric(model, other, x.shape[1:], output=output, dtype=dtype)
    scale = input_bounds(x)
    if d.log2 == -math.inf:
        return torch.zeros_like(scale)
    return torch.exp2(torch.log2(scale) + d.log2)


@ieee_float32()
def layer_distances(model, other, input_shape, *, output=None, dtype=torch.float64) -> dict:
    """``{layer: D(theta, theta with only that layer from other)}`` for every affine layer (a conv/linear
    with its folded batch-norm, or a standalone batch-norm), keyed by its module name.

    The path-norm is affine in the weights of one layer (every path crosses it at most once), so with
    ``u`` the layer's input and ``g = d||Phi||/d(output of the layer)`` in the path-norm pass of ``theta``,
    ``||Phi(theta)|| - ||Phi(theta'')|| = <(A - M) u + (b_A - b_M), g>`` exactly when only that layer
    differs. All layers together cost one forward and one backward pass plus one layer application each,
    instead of one coupled pass per layer. Layers whose module is called twice along one path fall back
    to :func:`path_metric` with only that layer changed. ``other``: a module, a state dict or a
    :class:`~pathsaliency.Theta`.
    """
    from .profile import profile
    from .saliency import _reentrant_modules

    dtype = compute_dtype(dtype)
    lifted, model = _lifted_pair(model, other, output)
    plan = lifted.plan
    shape = lifted.sample_shape(input_shape)
    prof = profile(model, lifted, shape, dtype)
    reentrant = set(_reentrant_modules(lifted, model))
    p, r = _signed(lifted, model, dtype, "reference model"), _signed(lifted, other, dtype, "other model")
    out_e = prof.cache[plan.output].e.to(torch.float64)
    result = {}
    with torch.no_grad():
        by_layer = {}
        for node, step in plan.affine.items():
            by_layer.setdefault(step.name, []).append(node)
        for name, nodes in by_layer.items():
            if name in reentrant:
                changed = Theta(model, {n.name: (r if n in nodes else p)[n] for n in p}, output)
                result[name] = path_metric(model, changed, shape, output=output, dtype=dtype)
                continue
            log2_d, exact = -math.inf, True
            for n in nodes:
                (w, b), (w2, b2) = p[n], r[n]
                exact = exact and (_dominates({n: (w, b)}, {n: (w2, b2)}) or _dominates({n: (w2, b2)}, {n: (w, b)}))
                m = Weights(_min(w, w2), _min(b, b2))
                for big in (Weights.absolute(w, b), Weights.absolute(w2, b2)):
                    log2_d = _log2_add(log2_d, _through_layer(plan.affine[n], prof, big, m, out_e))
            result[name] = PathMetric(log2_d, exact, prof.log2_norm)
    return result


def _through_layer(step, prof, big: Weights, small: Weights, out_e) -> float:
    """``log2 <(A - M) u + (b_A - b_M), g>`` at one affine step (0 -> -inf)."""
    u = prof.cache[step.input]
    x = step.linear(u.t, big.w - small.w)
    if big.b is not None:
        db = big.b - (small.b if small.b is not None else 0)
        x = x + step.bias_view(db, x.dim()) * torch.exp2(-u.e).view((-1,) + (1,) * (x.dim() - 1))
    dot = float((x.to(torch.float64) * prof.grads[step.node].to(torch.float64)).sum())
    if dot <= 0:
        return -math.inf
    full_e = prof.cache[step.node].e.to(torch.float64)
    return math.log2(dot) + float(u.e.to(torch.float64)[0] - full_e[0] + out_e[0])
