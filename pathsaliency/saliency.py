"""Saliencies: how much path-metric each weight or each channel carries (MATH.md section 6).

All scores are *relative*: the path-metric lost by the removal divided by ``||Phi(theta)||_1``, so they
are finite for any depth and share one unit across layers (global ranking needs no normaliser).
Multiply by ``.scale`` (``||Phi(theta)||_1`` as a :class:`PathValue`) for the absolute path-metric.

* :func:`path_magnitude` -- per weight ``|theta_i| * d||Phi||_1 / d|theta_i|``: exact (the path-norm is
  affine in each ``|theta_i|`` when no path uses a weight twice), one forward and one backward pass.
* :func:`channel_saliency` -- per candidate of a structured group: the exact path-metric lost when the
  candidate's neurons are removed (``||Phi(theta)|| - ||Phi(theta with S removed)||``, case 1). When the
  removed neurons form an antichain this is ``sum_v fwd(v) * bwd(v)`` (read from the same forward and
  backward pass); otherwise a batched removal pass propagates what is lost (shared upstream work is
  read from the cached forward pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from . import params
from .errors import PathSaliencyError
from .lifting import compute_dtype, lift
from .norm import PathValue
from .passes import Scaled, Weights, norm_pass, removal_pass
from .profile import profile


class Scores(dict):
    """``{parameter name: relative score tensor}`` with ``.scale`` = ``||Phi(theta)||_1``: multiply a
    score by ``float(scores.scale)`` for the path-metric lost (or add ``scale.log2`` in log space)."""

    scale: PathValue


def _affine_weights_with_grad(lifted, model, dtype):
    """Absolute weights whose conv/linear parts hang on leaves ``|W_raw|`` (one per module):
    ``|s * W| = |s| * |W|`` for a folded batch-norm scale ``s``."""
    tensors = params.named_tensors(model)
    leaves, weights = {}, {}
    for node, (w, b) in lifted.signed(model, dtype).items():
        step = lifted.plan.affine[node]
        if step.module is None:
            weights[node] = Weights(w.abs(), None if b is None else b.abs())
            continue
        leaf = leaves.get(step.module)
        if leaf is None:
            raw = tensors[f"{step.module}.weight"].detach().to(device=lifted.device, dtype=dtype)
            leaf = leaves[step.module] = raw.abs().requires_grad_(True)
        a = leaf
        if step.bn is not None:
            s, _ = params.bn_affine(step, tensors, dtype, lifted.device)
            a = params.scale_outputs(step, leaf, s.abs())
        weights[node] = Weights(a, None if b is None else b.abs())
    return weights, leaves


def _reentrant_modules(lifted) -> list:
    """Modules called several times where one call's output reaches another call (a path may then
    use the same weight twice, and the gradient is no longer the removal)."""
    plan = lifted.plan
    bad = []
    for name in plan.shared:
        nodes = [s.node for s in plan.module_steps(name)]
        for n in nodes:
            reach = plan.reachable_from([n])
            if any(m is not n and m in reach for m in nodes):
                bad.append(name)
                break
    return bad


def path_magnitude(model: nn.Module, input_shape, *, output=None, dtype=torch.float32) -> Scores:
    """Per-weight path-magnitude scores of every conv/linear weight, keyed by parameter name.

    ``score_i = |theta_i| * d||Phi(theta)||_1 / d|theta_i| / ||Phi(theta)||_1``: the fraction of the
    path-norm (and exactly the path-metric) lost by setting weight ``i`` alone to zero. Invariant under
    neuron rescaling. A module whose output feeds itself again (a path may use its weights twice) is
    refused: removal is then not first-order.
    """
    dtype = compute_dtype(dtype)
    lifted = lift(model, output)
    bad = _reentrant_modules(lifted)
    if bad:
        raise PathSaliencyError(
            f"modules {bad} are called several times along one path: a path can use their weights twice, so "
            "the one-pass score is not the removal; compute those by path_metric(model, model_with_weight_zeroed)")
    shape = lifted.sample_shape(input_shape)
    with torch.enable_grad():  # also when the caller is under torch.no_grad()
        weights, leaves = _affine_weights_with_grad(lifted, model, dtype)
        log2, env = norm_pass(lifted.plan, weights, shape, dtype=dtype, device=lifted.device)
        out = env[lifted.plan.output]
        total = out.t.sum(dtype=torch.float64)
        total.backward()
    scores = Scores()
    tensors = params.named_tensors(model)
    norm = total.detach()
    for name, leaf in leaves.items():
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        score = (leaf.detach() * grad).to(torch.float64)
        score = score / norm if norm > 0 else torch.zeros_like(score)  # no path, nothing to lose
        pname = f"{name}.weight"
        scores[pname] = score.to(tensors[pname].device).view_as(tensors[pname])
    scores.scale = PathValue(float(log2.detach()[0]))
    return scores


# ----------------------------------------------------------------------------------------------------
# Structured groups
# ----------------------------------------------------------------------------------------------------


@dataclass
class Removal:
    """Channels of one module that the candidates of a group remove.

    ``side="out"``: output channels (features) of a conv/linear, or channels of a batch-norm;
    ``side="in"``: input channels (features) of a conv/linear. ``index[k]`` is removed by candidate
    ``candidate[k]``.
    """

    module: str
    side: str
    index: torch.Tensor
    candidate: torch.Tensor


def channel_saliency(model: nn.Module, input_shape, removals, num_candidates: int, *, exact=True, output=None,
                     dtype=torch.float32, memory_budget=512 * 2**20) -> torch.Tensor:
    """Relative path-metric lost by each of ``num_candidates`` structured removals (float64, CPU).

    ``removals``: :class:`Removal` items; candidate ``j`` removes every listed channel whose
    ``candidate`` is ``j``: the output neurons of those channels (read after a folded batch-norm, so that
    paths starting at its shift are included) and, for ``side="in"``, the edges from those input
    channels. The score is exactly ``(||Phi(theta)|| - ||Phi(theta without candidate j)||) / ||Phi(theta)||``
    (MATH.md section 6). ``exact=False`` gives the cheaper first-order sum of ``fwd(v) * bwd(v)`` over the
    removed neurons, which over-counts paths that cross the group twice (it equals the exact score when
    the neurons form an antichain). The forward/backward work is cached per model state, so calling this
    for every group of a model costs one forward and one backward plus the removal passes.
    """
    dtype = compute_dtype(dtype)
    lifted = lift(model, output)
    plan = lifted.plan
    shape = lifted.sample_shape(input_shape)
    prof = profile(model, lifted, shape, dtype)
    masks, in_masks = {}, {}
    for r in removals:
        step = _step_of(lifted, r.module)
        side = "out" if (r.side == "out" or r.module == step.bn) else "in"
        target = masks if side == "out" else in_masks
        node = step.node
        if side == "out":
            width = prof.cache[node].t.shape[step.channel_dim]
        else:
            width = prof.cache[step.input].t.shape[step.channel_dim]
        m = target.get(node)
        if m is None:
            m = target[node] = torch.zeros(num_candidates, width, dtype=torch.bool)
        idx, cand = torch.as_tensor(r.index).long().cpu(), torch.as_tensor(r.candidate).long().cpu()
        if len(idx) and (int(idx.max()) >= width or int(idx.min()) < 0):
            raise PathSaliencyError(f"channel index out of range for '{r.module}' ({side}, {width} channels)")
        m[cand, idx] = True
    first_order = torch.zeros(num_candidates, dtype=torch.float64)
    for node, m in masks.items():
        loss = prof.channel_loss[node].cpu()
        first_order += (m.to(torch.float64) * loss.view(1, -1)).sum(1)
    if not exact or _is_antichain(plan, masks, in_masks):
        return first_order
    return _removal_scores(lifted, prof, shape, masks, in_masks, num_candidates, dtype, memory_budget)


def _step_of(lifted, module):
    steps = lifted.plan.module_steps(module)
    if not steps:
        raise PathSaliencyError(f"'{module}' is not a conv, linear or batch-norm layer that the output depends on")
    if len(steps) > 1:
        raise PathSaliencyError(f"'{module}' is called {len(steps)} times in one forward pass: removing its channels "
                                "removes neurons at several places; structured scores for shared modules are not supported")
    return steps[0]


def _is_antichain(plan, masks, in_masks) -> bool:
    """No removed neuron reaches another (node level), and every removed input channel is already a
    removed output channel carried unchanged (ReLU, pooling, reshapes) to the consumer."""
    nodes = list(masks)
    for n in nodes:
        reach = plan.reachable_from([n])
        if any(m is not n and m in reach for m in nodes):
            return False
    if in_masks:
        carried = plan.reachable_from(nodes, through=lambda x: x in plan.actions and not plan.actions[x].combines)
        return all(plan.affine[n].input in carried for n in in_masks)
    return True


def _removal_scores(lifted, prof, shape, masks, in_masks, num, dtype, budget):
    plan = lifted.plan
    per_sample = max(v.t[:1].numel() for v in prof.cache.values() if isinstance(v, Scaled)) * 8 * torch.finfo(dtype).bits // 8
    chunk = max(1, int(budget // max(per_sample, 1)))
    out = []
    dev = lifted.device
    with torch.no_grad():
        for start in range(0, num, chunk):
            sl = slice(start, min(num, start + chunk))
            k = sl.stop - sl.start
            m = {n: v[sl].to(dev) for n, v in masks.items()}
            im = {n: v[sl].to(dev) for n, v in in_masks.items()}
            log2 = removal_pass(plan, prof.weights, prof.cache, m, im, k, shape, dtype=dtype, device=dev,
                                grads=prof.grads)
            out.append(torch.exp2(log2.cpu() - prof.log2_norm))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
