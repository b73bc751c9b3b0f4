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

import torch
import torch.nn as nn

from . import distributed, params
from .errors import PathSaliencyError
from .interpreter import norm_pass, removal_pass
from .lifting import compute_dtype, lift
from .norm import PathValue
from .ops import ChannelMap, Sum
from .precision import ieee_float32
from .profile import profile
from .scaled import Scaled
from .steps import BatchNormStep, Weights


class Scores(dict):
    """``{parameter name: relative score tensor}`` with ``.scale`` = ``||Phi(theta)||_1``: multiply a
    score by ``float(scores.scale)`` for the path-metric lost (or add ``scale.log2`` in log space)."""

    scale: PathValue


def _canonical_names(tensors) -> dict:
    """id(tensor) -> the first of its names in ``tensors`` (``params.named_tensors``: the name
    ``model.named_parameters()`` gives a tied tensor). Pass the same mapping the ids are looked up in:
    a parametrized weight is computed anew at every read."""
    names = {}
    for name, t in tensors.items():
        names.setdefault(id(t), name)
    return names


def _affine_weights_with_grad(lifted, model, dtype):
    """The cached absolute weights of every step, the conv/linear ones as fresh autograd leaves over the
    same memory (no copy; the cache itself is not changed), and ``{canonical tensor name: [its step
    nodes]}``: a module called twice, or modules sharing a tensor, have one entry with several nodes."""
    tensors = params.named_tensors(model)
    canonical = _canonical_names(tensors)
    weights, uses = {}, {}
    for node, wts in lifted.absolute(model, dtype).items():
        step = lifted.plan.affine[node]
        if step.module is None:
            weights[node] = wts
            continue
        weights[node] = Weights(wts.w.detach().requires_grad_(True), wts.b)
        uses.setdefault(canonical[id(tensors[params.qualified(step.module, "weight")])], []).append(node)
    return weights, uses


def _reentrant_modules(lifted, model) -> list:
    """Modules whose weight tensor is used by several steps (a module called several times, or modules
    sharing one tensor) where one use's output reaches another use: a path may then use the same weight
    twice, and the gradient is no longer the removal."""
    plan, tensors = lifted.plan, params.named_tensors(model)
    uses = {}
    for step in plan.steps:
        if step.module is not None:
            uses.setdefault(id(tensors[params.qualified(step.module, "weight")]), []).append(step)
    bad = []
    for steps in uses.values():
        nodes = [s.node for s in steps]
        if any(any(m is not n and m in plan.reachable_from([n]) for m in nodes) for n in nodes):
            bad += sorted({s.module for s in steps})
    return bad


@ieee_float32()
def path_magnitude(model: nn.Module, input_shape, *, output=None, dtype=torch.float32) -> Scores:
    """Per-weight path-magnitude scores of every conv/linear weight, keyed by parameter name (a tensor
    shared by several modules once, under the name ``model.named_parameters()`` gives it).

    ``score_i = |theta_i| * d||Phi(theta)||_1 / d|theta_i| / ||Phi(theta)||_1``: the fraction of the
    path-norm (and exactly the path-metric) lost by setting weight ``i`` alone to zero. Invariant under
    neuron rescaling. A module whose output feeds itself again (a path may use its weights twice) is
    refused: removal is then not first-order.
    """
    dtype = compute_dtype(dtype)
    lifted = lift(model, output)
    bad = _reentrant_modules(lifted, model)
    if bad:
        raise PathSaliencyError(
            f"weights {[params.qualified(m, 'weight') for m in bad]} are used several times along one path (a module called "
            "twice, or modules sharing one tensor): a path can use them twice, so the one-pass score is not the "
            "removal; compute those by path_metric(model, model_with_weight_zeroed)")
    shape = lifted.sample_shape(input_shape)
    with torch.enable_grad():  # also when the caller is under torch.no_grad()
        weights, uses = _affine_weights_with_grad(lifted, model, dtype)
        if not uses:
            raise PathSaliencyError("the model has no conv or linear weight on a path to the output: "
                                    "path_magnitude has nothing to score")
        log2, env = norm_pass(lifted.plan, weights, shape, dtype=dtype, device=lifted.device)
        total = env[lifted.plan.output].t.sum(dtype=torch.float64)
        norm = float(total.detach())
        nodes = [n for ns in uses.values() for n in ns]
        grads = dict.fromkeys(nodes)
        if norm > 0:  # the gradient of total / norm: relative scores straight out of the backward pass
            seed = torch.full_like(total, 1.0 / norm)
            grads.update(zip(nodes, torch.autograd.grad(total, [weights[n].w for n in nodes], seed, allow_unused=True)))
    # |W| * d||Phi||/d|W| of a step with a folded batch-norm scale s is |s W| * d||Phi||/d|s W| (chain rule per
    # entry): the product of the leaf and its gradient, in the pass's dtype (the gradient is no more precise),
    # written into the gradient itself (a fresh tensor of the backward's: no allocation of score-sized memory)
    scores = Scores()
    tensors = params.named_tensors(model)
    for pname, ns in uses.items():
        score = None
        for n in ns:
            g = grads[n]
            if g is None:  # no path through it, or none at all
                continue
            g = g.mul_(weights[n].w.detach())
            score = g if score is None else score.add_(g)
        if score is None:
            score = torch.zeros_like(weights[ns[0]].w, requires_grad=False)
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


@ieee_float32()
def channel_saliency(model: nn.Module, input_shape, removals, num_candidates: int, *, exact=True, output=None,
                     dtype=torch.float32, memory_budget=None, shard=None, progress=None) -> torch.Tensor:
    """Relative path-metric lost by each of ``num_candidates`` structured removals (float64, CPU).

    ``removals``: :class:`Removal` items; candidate ``j`` removes every listed channel whose
    ``candidate`` is ``j``: the output neurons of those channels (read after a folded batch-norm, so that
    paths starting at its shift are included) and, for ``side="in"``, the edges from those input
    channels. The score is exactly ``(||Phi(theta)|| - ||Phi(theta without candidate j)||) / ||Phi(theta)||``
    (MATH.md section 6). ``exact=False`` gives the cheaper first-order sum of ``fwd(v) * bwd(v)`` over the
    removed neurons, which over-counts paths that cross the group twice (it equals the exact score when
    the neurons form an antichain). The forward/backward work is cached per model state, so calling this
    for every group of a model costs one forward and one backward plus the removal passes.
    ``memory_budget`` (bytes) sizes the batches of candidates of a removal pass: by default 256 MiB on a
    CPU (ResNet-50 at 224, one thread: 64 and 256 MiB within the noise, 1 GiB 1.7x slower) and 2 GiB on
    a GPU.
    ``shard="auto"`` (or a process group) splits the removal passes' candidates across the ranks of an
    initialised ``torch.distributed`` group (a collective call; every rank returns the whole vector,
    identical to one process: :mod:`pathsaliency.distributed`).
    ``progress``: a callable ``progress(done, total)`` called after each chunk of candidates of a removal
    pass (``done`` of ``total`` candidates on this rank), never for a group that needs none.
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
    if not exact:
        return _first_visit(prof, masks, {}, num_candidates)
    dependents = _dependents(plan, prof, masks, in_masks)
    if dependents is not None:
        return _first_visit(prof, masks, dependents, num_candidates)
    in_masks = _without_lost_inputs(plan, prof, masks, in_masks)
    return _removal_scores(lifted, prof, shape, masks, in_masks, num_candidates, dtype, memory_budget, shard,
                           progress)


def _first_visit(prof, masks, dependents, num):
    """``sum over removed neurons v of fwd~(v) * bwd(v)``, by the first removed neuron a path visits:
    ``fwd~ = fwd`` for a neuron no other removed neuron reaches, ``fwd~ = |bias|`` for a standalone
    batch-norm neuron whose only input is a removed neuron (``dependents``)."""
    if not masks:
        return torch.zeros(num, dtype=torch.float64)
    nodes = list(masks)
    dev = prof.channel_loss[nodes[0]].device
    moved = torch.cat([masks[n] for n in nodes], 1).to(dev, torch.float64)  # one copy to the device
    scores = None
    for node, m in zip(nodes, moved.split([masks[n].shape[1] for n in nodes], 1)):
        per_channel = prof.bias_loss[node] if node in dependents else prof.channel_loss[node]
        s = (m * per_channel.view(1, -1)).sum(1)
        scores = s if scores is None else scores + s
    return scores.cpu()


def _dependents(plan, prof, masks, in_masks):
    """The set of masked standalone batch-norms fed only by masked channels, when the first-visit sum is
    exact for this group; None when a removal pass is needed.

    Exact when (1) no other removed node reaches a *root* (a removed node that is not such a batch-norm),
    (2) every removed channel of a dependent batch-norm, and every removed input channel, comes for the
    same candidate from a removed channel through channel-preserving operators (ReLU, pooling,
    concatenation, flatten): then the removed edges are those of removed neurons."""
    masked = list(masks)
    origin = _channel_origins(plan, prof, masked)
    removed = torch.cat([masks[n] for n in masked], 1)  # (num, channels of every masked node)

    def covered(node_input, m):
        ids = origin.get(node_input)
        if ids is None:
            return False
        j, ch = m.nonzero(as_tuple=True)
        src = ids[ch]
        return bool((src >= 0).all()) and bool(removed[j, src.clamp_min(0)].all())

    deps = {n for n in masked if isinstance(plan.affine[n], BatchNormStep)
            and covered(plan.affine[n].input, masks[n])}
    roots = [n for n in masked if n not in deps]
    for r in roots:
        if r in plan.reachable_from([n for n in masked if n is not r]):
            return None
    for n, m in in_masks.items():
        if not covered(plan.affine[n].input, m):
            return None
    return deps


def _channel_origins(plan, prof, roots) -> dict:
    """node -> for each channel (dim 1) the index (among the channels of the ``roots`` nodes, in order) of
    the channel it carries unchanged, or -1."""
    ids, start = {}, 0
    for r in roots:
        width = prof.cache[r].t.shape[plan.affine[r].channel_dim]
        ids[r] = torch.arange(start, start + width)
        start += width
    for n in plan.nodes:
        if n in ids or n in plan.static or n in plan.affine:
            continue
        action = plan.actions.get(n)  # None for the input and the output node
        channels = action.channels if action is not None else None
        inputs = [a for a in n.all_input_nodes if a not in plan.static]
        if channels is ChannelMap.KEEP and inputs and inputs[0] in ids:
            ids[n] = ids[inputs[0]]
        elif channels is ChannelMap.CONCAT and any(p in ids for p in n.args[0]):
            ids[n] = torch.cat([ids[p] if p in ids else torch.full((prof.cache[p].t.shape[1],), -1)
                                for p in n.args[0]])
        elif channels is ChannelMap.FLATTEN and inputs and inputs[0] in ids:
            t = prof.cache[inputs[0]].t
            ids[n] = ids[inputs[0]].repeat_interleave(t[0].numel() // t.shape[1])
    return ids


def _lost_channels(plan, prof, masks) -> dict:
    """node -> bool ``(num, C)``: channels (dim 1) whose every neuron candidate ``j`` removes with all
    their paths: a removed output channel, the same channel after operators that read channel ``c``
    only (ReLU, pooling: ``ChannelMap.KEEP``), a sum whose inputs have all lost that channel, and the
    channels of a concatenation that came lost."""
    lost = {}
    for n in plan.nodes:
        if n in plan.static or not isinstance(prof.cache.get(n), Scaled):
            continue
        if n in plan.affine:
            step = plan.affine[n]
            if n in masks and step.channel_dim % prof.cache[n].t.dim() == 1:
                lost[n] = masks[n]
            continue
        action = plan.actions.get(n)
        inputs = [a for a in n.all_input_nodes if a not in plan.static]
        if action is None or not inputs:
            continue
        if action.channels is ChannelMap.KEEP and inputs[0] in lost:
            lost[n] = lost[inputs[0]]
        elif isinstance(action, Sum) and len(inputs) == 2 and all(a in lost for a in inputs) and all(
                prof.cache[a].t.shape == prof.cache[n].t.shape for a in inputs):
            lost[n] = lost[inputs[0]] & lost[inputs[1]]
        elif action.channels is ChannelMap.CONCAT and any(p in lost for p in n.args[0]):
            num = next(lost[p] for p in n.args[0] if p in lost).shape[0]
            lost[n] = torch.cat([lost[p] if p in lost else torch.zeros(num, prof.cache[p].t.shape[1], dtype=torch.bool)
                                 for p in n.args[0]], 1)
    return lost


def _without_lost_inputs(plan, prof, masks, in_masks) -> dict:
    """``in_masks`` without the input channels that the candidate's removed neurons already take away
    whole (:func:`_lost_channels`): removing their edges too removes nothing more, so the removal pass
    need not go past them (a residual stream's group lists the next stage's input channels)."""
    if not in_masks:
        return in_masks
    lost = _lost_channels(plan, prof, masks)
    out = {}
    for n, m in in_masks.items():
        step = plan.affine[n]
        gone = lost.get(step.input)
        if gone is not None and step.channel_dim % prof.cache[step.input].t.dim() == 1 and gone.shape == m.shape:
            m = m & ~gone
        if bool(m.any()):
            out[n] = m
    return out


def _step_of(lifted, module):
    steps = lifted.plan.module_steps(module)
    if not steps:
        raise PathSaliencyError(lifted.plan.not_a_step(module))
    if len(steps) > 1:
        raise PathSaliencyError(f"'{module}' is called {len(steps)} times in one forward pass: removing its channels "
                                "removes neurons at several places; structured scores for shared modules are not supported")
    return steps[0]


def _removal_scores(lifted, prof, shape, masks, in_masks, num, dtype, budget, shard, progress=None):
    """Batched removal passes, in chunks of candidates whose recomputed activations fit ``budget`` bytes
    (about 8 live tensors of the largest activation that a removed neuron reaches, per candidate); the
    chunks are dealt to the ranks of ``shard``."""
    plan = lifted.plan
    if budget is None:
        budget = (2 * 2**30) if lifted.device.type == "cuda" else 256 * 2**20
    reach = plan.reachable_from(set(masks) | set(in_masks))
    largest = max((v.t[:1].numel() for n, v in prof.cache.items() if n in reach and isinstance(v, Scaled)), default=1)
    per_sample = 8 * largest * torch.finfo(dtype).bits // 8
    chunk = max(1, int(budget // per_sample))
    dev = lifted.device
    weights = prof.removal_weights(plan)
    masks = {n: v.to(dev) for n, v in masks.items()}
    in_masks = {n: v.to(dev) for n, v in in_masks.items()}

    done = 0

    def log2_lost(sl):
        nonlocal done
        with torch.no_grad():
            out = removal_pass(plan, weights, prof.cache, {n: v[sl] for n, v in masks.items()},
                               {n: v[sl] for n, v in in_masks.items()}, sl.stop - sl.start, shape, dtype=dtype,
                               device=dev, grads=prof.grads)
        if progress is not None:
            done += sl.stop - sl.start
            progress(done, num)
        return out

    slices = [slice(start, min(num, start + chunk)) for start in range(0, num, chunk)]
    log2 = distributed.map_chunks(log2_lost, slices, device=dev, shard=shard)
    return torch.exp2(log2.cpu() - prof.log2_norm)
