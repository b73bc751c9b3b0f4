"""Rescaling-invariant unstructured pruning criteria built from the path-norm pass (MATH.md section 6).

Invariant, here and in the tests, means: the scores (and so the masks) are unchanged, bit for bit for
power-of-two factors, by every rescaling of the *hidden* channels, the symmetry
:func:`pathsaliency.random_rescale` draws (a channel whose producer is a conv/linear, through its
batch-norm if it has one, and whose readers are convs/linears). A residual stream's channel can be
rescaled too, but only as a family (every batch-norm that writes it and every layer that reads it, a
whole stage at once, which ``random_rescale`` does not draw); ``norm-balanced`` and ``norm-matched`` read
the stream as trained, as plain magnitude does, so such a family rescaling would move them.

Notation. The path-norm pass runs the network with ``|theta|`` (batch-norm folded into the conv/linear
before it), ReLU as the identity, max-pool as a window sum, on the all-ones input. For a neuron ``v``,
``F(v)`` is its value in that pass and ``B(v) = d||Phi||_1 / dv`` (the sum over path suffixes from
``v``); ``F(v) B(v)`` is the path mass through ``v``. For a weight ``w_ij`` from input neuron ``j`` (the
activation the conv/linear reads: after the previous ReLU, or the residual stream) to output neuron
``i`` (read *after* the folded batch-norm, so ``w_ij`` is the folded weight ``s_i W_ij`` and the paths
that start at the batch-norm shift count in ``i``'s mass), summed over the positions that share the weight:

* ``path-magnitude`` ``p(w_ij) = |w_ij| F(j) B(i) / ||Phi||_1``: the path-metric lost by removing the
  weight alone (:func:`pathsaliency.path_magnitude`). Within one layer that cuts every path, these sum
  to 1: layers with many weights get small scores and are emptied first (layer collapse).
* ``balanced`` ``b(w_ij) = p(w_ij) / sqrt(m(i) m(j))`` with ``m(c) = sum over the neurons v of channel c
  of F(v) B(v) / ||Phi||_1`` (per channel: neurons of one channel share their weights). Rescaling a
  hidden channel ``c`` by ``lam`` multiplies ``F`` by ``lam`` and divides ``B`` by ``lam``, so ``m(c)``,
  ``p`` and ``b`` are unchanged. In a network rescaled so that every hidden channel has ``F = B`` (always
  possible, per channel, for a single position: ``lam = sqrt(B / F)``), ``b(w_ij) = |w_ij| ||Phi||_1 /
  ||Phi||_1 = |w_ij|`` up to the spread over positions: it is plain magnitude on the balanced
  representative of the rescaling orbit, which is why it keeps magnitude's accuracy while magnitude
  itself depends on the arbitrary representative. The model input's channels are not rescalable; their
  mass is read through the conservation law ``F(j) B(j) = sum over edges j -> i of |w_ij| F(j) B(i)``.
* ``balanced-fan``: ``b(w_ij) * sqrt(fan_out)`` with ``fan_out`` = output channels (of one group) x
  kernel positions of the layer (:func:`fan_out`), a constant of the architecture. Why: in the balanced representative a
  layer cut carries total mass 1 spread over ``C`` channels of ``P`` positions, so ``F = B ~
  1/sqrt(C P)`` and ``|w| ~ 1/(sqrt(C_in C_out) k)`` for ``k`` kernel positions, where a trained network
  has ``|w| ~ 1/sqrt(C_in k)`` (the l2 scale of He initialisation and weight decay): ``b`` under-scores
  wide layers by ``sqrt(C_out k)``, which this factor undoes, so that global ranking allots sparsity
  across layers as magnitude does. Invariant (a constant times an invariant score).
* ``balanced-lamp``: LAMP's per-layer normalisation (Lee et al. 2021) of the balanced scores,
  ``b_k^2 / sum_{l >= k} b_l^2`` over one layer's scores sorted ascending: still invariant (a function of
  invariant scores), and it keeps every layer's largest weights.
* ``path-lamp``: LAMP of the path-magnitude scores.

* ``norm-balanced`` ``n(w_ij) = |W_ij| sqrt(|gamma_j| / ||W_:j||)``: plain magnitude on the *norm-balanced*
  representative of the rescaling orbit, where every rescalable hidden channel ``j`` has as much weight
  going in (its batch-norm's ``|gamma_j|``) as going out (``||W_:j||_2``, the l2 norm of the columns of
  every conv/linear reading it); rows of batch-norm-followed layers are compared as trained (the gauge
  the batch-norm fixes), the model input and residual sums are not rescalable (factor 1). Rescaling ``j``
  by ``lam`` multiplies ``gamma_j`` by ``lam`` and divides ``W_:j`` by it: the factor absorbs both
  (exactly, for powers of two). Weight decay drives a trained network towards this balance (the loss is
  flat along the orbit, the decay is not), which is why magnitude works on trained networks and fails
  after a rescaling. Defined when every rescalable channel's producer is followed by a batch-norm
  its readers' rows are not themselves rescaled (ResNets, VGG-BN, DenseNets); other models are refused
  with the channel named.
* ``norm-balanced-lamp``: LAMP of ``norm-balanced`` (global pruning).
* ``norm-matched`` ``|W_ij| sqrt(r |gamma_j| / ||W_:j||)``, ranked globally (no per-layer normaliser): plain
  magnitude on the representative where every rescalable hidden channel has the out/in norm ratio
  ``||W_:j|| / |gamma_j| = r`` that the trained network has on its *non-rescalable* channels (the residual
  stream), every other weight as trained. ``r = sqrt(mean ||W_:c||^2 / mean gamma_c^2)``: the mean squared
  column norm of the conv/linear layers that read non-rescalable channels (the residual blocks' first
  convs, the classifier; not the layers reading the model input) over the mean squared ``gamma`` of the
  batch-norms that write them (the blocks' last batch-norms, the stem's). Why: global magnitude compares
  the stream readers' weights, which sit at the trained ratio ``r``, with the hidden readers' weights;
  ``norm-balanced`` moves only the hidden channels to ratio 1 (CIFAR ResNet-20/32: ``r`` = 2.2 / 2.4 on the
  stream, 2.7 / 2.6 on the hidden channels, ``||W_:j|| / |gamma_j|`` as trained), which under-scores every
  hidden reader by ``sqrt(r)`` and empties them first under global ranking; ``norm-matched`` puts them in the
  stream's gauge. Invariant: ``r`` reads only parameters that a rescaling does not touch (the writers'
  ``gamma`` belong to non-rescalable channels, the readers consume none), and ``sqrt(|gamma_j| /
  ||W_:j||)`` absorbs the hidden channel's factor as in ``norm-balanced``. Without batch-norm-fixed
  channels that a conv/linear reads directly (VGG-BN: every hidden channel is rescalable; DenseNets: a
  batch-norm of its own before every reader) ``r = 1``: global ``norm-balanced`` (:func:`stream_ratio`).

Data-aware (they need ``calibration`` inputs, e.g. the images used to re-estimate batch-norm statistics):

* ``wanda`` ``a(w_ij) = |W_ij| rms(x_j) / r(i)``: the weight's typical contribution ``|W_ij x_j|`` to its
  output (Sun et al. 2023's |W| ||X||), with ``x_j`` the layer's input channel ``j`` on the calibration
  data (root mean square over samples and positions) and ``W`` the weight as the module holds it (before
  batch-norm folding). Invariance: rescaling a hidden channel ``j`` by ``lam`` multiplies ``x_j`` by ``lam``
  and divides ``W_ij`` by it. On the output side, a conv/linear followed by a batch-norm is rescaled
  through the batch-norm's ``gamma`` and ``beta``, which leave ``W`` unchanged: its rows are compared as
  the training left them (in the gauge the batch-norm fixes, where weight decay made small rows the
  unimportant ones), ``r(i) = 1``. A rescalable hidden channel without a batch-norm has its row
  multiplied by ``lam``: ``r(i) = rms(y_i)``, its output on the calibration data, cancels it. Every other
  output (the network's outputs, a residual sum) is not rescalable: ``r(i) = 1``. With power-of-two
  factors every activation scales exactly, so the masks are bit-identical.
* ``wanda-lamp``: LAMP of the ``wanda`` scores (global pruning: the raw scores' scale differs from layer
  to layer, as the activations' does).

Every criterion returns ``{weight name: score}`` in the shape of the weight, higher = keep.

Structured use: :func:`norm_balanced_parameters` is the whole norm-balanced representative (weights,
batch-norm ``gamma`` and ``beta``); ``pathsaliency.integrations.torch_pruning.NormBalancedImportance``
runs torch-pruning's group magnitude importance on it, so any of its reductions is invariant. NNCF's
unstructured masks take the scores of this module as they are (``masks_from_scores``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import steps
from .evaluate import batches
from .lifting import compute_dtype, lift
from .profile import profile
from .params import qualified
from .rescale import rescalable_channels
from .saliency import _step_of, path_magnitude

DATA_CRITERIA = ("wanda-lamp", "wanda")
INVARIANT_CRITERIA = DATA_CRITERIA + ("norm-matched", "norm-balanced-lamp", "norm-balanced", "balanced-fan", "balanced",
                                      "balanced-lamp", "path-lamp")


def invariant_scores(model: nn.Module, input_shape, criterion: str, names, *, output=None,
                     dtype=torch.float32, calibration=None) -> dict:
    """``{name: score}`` of ``criterion`` (one of :data:`INVARIANT_CRITERIA`) for the weights ``names``;
    the data-aware ones (:data:`DATA_CRITERIA`) read ``calibration``: a tensor of inputs, or an iterable of
    input batches or ``(input, target)`` batches."""
    if criterion not in INVARIANT_CRITERIA:
        raise ValueError(f"criterion must be one of {INVARIANT_CRITERIA}, got {criterion!r}")
    plan = lift(model, output).plan
    restrict({n: None for n in names if plan.module_steps(n.rpartition(".")[0])}, names, criterion)
    if criterion in DATA_CRITERIA:
        if calibration is None:
            raise ValueError(f"{criterion} is data-aware: pass calibration=<a tensor of inputs or an iterable of "
                             "batches>, e.g. the images used to re-estimate batch-norm statistics")
        scores = wanda_scores(model, names, calibration, output=output)
        return {n: lamp(s) for n, s in scores.items()} if criterion == "wanda-lamp" else scores
    if criterion == "norm-matched":
        return norm_matched_scores(model, names, output=output)
    if criterion.startswith("norm-balanced"):
        scores = norm_balanced_scores(model, names, output=output)
        return {n: lamp(s) for n, s in scores.items()} if criterion == "norm-balanced-lamp" else scores
    pm = path_magnitude(model, input_shape, output=output, dtype=dtype)
    pm = restrict(pm, names, criterion)
    if criterion == "path-lamp":
        return {n: lamp(s) for n, s in pm.items()}
    scores = balanced_scores(model, input_shape, pm, output=output, dtype=dtype)
    if criterion == "balanced-fan":
        modules = dict(model.named_modules())
        return {n: s * fan_out(modules[n.rpartition(".")[0]]) ** 0.5 for n, s in scores.items()}
    if criterion == "balanced-lamp":
        return {n: lamp(s) for n, s in scores.items()}
    return scores


def norm_balanced_scores(model: nn.Module, names, *, output=None) -> dict:
    """``|W_ij| sqrt(|gamma_j| / ||W_:j||)`` for the conv/linear weights ``names`` (see the module
    docstring): the absolute weights of :func:`norm_balanced_parameters`."""
    rep = norm_balanced_parameters(model, output, hint="use wanda-lamp or balanced-fan")
    return {n: rep[n].abs() for n in names}


def norm_matched_scores(model: nn.Module, names, *, output=None) -> dict:
    """``|W_ij| sqrt(r |gamma_j| / ||W_:j||)`` for the conv/linear weights ``names`` (see ``norm-matched`` in
    the module docstring): the absolute weights of :func:`norm_balanced_parameters` at the ratio
    ``r = stream_ratio(model)``; weights that read no rescalable channel are scored ``|W_ij|``."""
    rep = norm_balanced_parameters(model, output, hint="use wanda-lamp or balanced-fan",
                                   ratio=stream_ratio(model, output))
    return {n: rep[n].abs() for n in names}


def stream_ratio(model: nn.Module, output=None, default=1.0):
    """``r = sqrt(mean ||W_:c||_2^2 / mean gamma_c^2)``: the out/in norm ratio of the trained network's
    non-rescalable channels (``norm-matched`` in the module docstring). The *writers* are the conv/linear
    layers with a folded affine batch-norm whose channels are not rescalable (and are not the network's
    output): a residual block's last batch-norm, the stem's. The *readers* are the conv/linear layers
    that a writer's output reaches through parameter-free operators only (ReLU, pooling, padding, the
    residual sums; a batch-norm of its own or a conv/linear stops the walk): the residual blocks' first
    convs, the downsampling convs, the classifier. The numerator averages the squared l2 norm of every
    input column of every reader, the denominator ``gamma_c^2`` over every channel of every writer.
    No parameter it reads is touched by a rescaling (a writer's channels are not rescalable; a layer that
    consumes a rescalable channel is never a reader), so it is invariant, exactly. A weight-shared module
    counts once. ``default`` (1.0) when either set is empty: no batch-norm-fixed channel that a
    conv/linear reads without a batch-norm in between (plain VGG-BN, DenseNets' pre-activation blocks)."""
    plan = lift(model, output).plan
    params = dict(model.named_parameters())
    channels = rescalable_channels(plan)
    producers = {step.module for step, _ in channels}
    consumers = {s.module for _, cons in channels for s, _ in cons}  # never readers: a rescaling moves them
    readers_of = {}
    for step in plan.steps:
        readers_of.setdefault(step.input, []).append(step)
    weighted = (steps.ConvStep, steps.ConvTransposeStep, steps.LinearStep)
    writers, readers, frontier, seen = {}, {}, [], set()
    for step in plan.steps:
        gamma = qualified(step.bn, "weight") if step.bn is not None else None
        if (isinstance(step, weighted) and step.module not in producers and gamma in params
                and step.node is not plan.output):
            writers.setdefault(step.module, params[gamma])
            frontier.append(step.node)
    while frontier:
        node = frontier.pop()
        if node in seen or node is plan.output:
            continue
        seen.add(node)
        for s in readers_of.get(node, []):
            if isinstance(s, weighted) and s.module not in consumers:
                readers.setdefault(s.module, s)
        frontier += [u for u in node.users if u not in plan.absorbed and u not in plan.affine]
    in_sq = sum(float((g.detach().to(torch.float64) ** 2).sum()) for g in writers.values())
    in_n = sum(g.numel() for g in writers.values())
    out_sq = out_n = 0
    for mname, s in readers.items():
        w = params[qualified(mname, "weight")].detach().to(torch.float64)
        out_sq += float((w * w).sum())
        out_n += _input_features(s, w)
    if not (out_n and in_n and in_sq > 0):
        return default
    return ((out_sq / out_n) / (in_sq / in_n)) ** 0.5


def _input_features(step, w) -> int:
    """The input features (columns) of a conv/linear weight ``w``: input channels of a conv, every
    input coordinate of a linear layer."""
    if isinstance(step, steps.ConvTransposeStep):  # (in, out / groups, *k)
        return int(w.shape[0])
    if isinstance(step, steps.LinearStep):
        return int(w.shape[1])
    return int(w.shape[1]) * step.conv.groups


def norm_matched_defined(model: nn.Module, output=None) -> bool:
    """Whether ``norm-matched`` reads its ratio from ``model``: ``norm-balanced`` is defined and the network
    has non-rescalable batch-norm channels read by a conv/linear (a residual stream; else ``r = 1``)."""
    return norm_balanced_defined(model, output) and stream_ratio(model, output, default=None) is not None


def norm_balanced_defined(model: nn.Module, output=None) -> bool:
    """Whether ``norm-balanced`` is defined for ``model``: every rescalable layer has an affine batch-norm."""
    return not _without_batchnorm(rescalable_channels(lift(model, output).plan), dict(model.named_parameters()))


def _without_batchnorm(channels, params) -> list:
    return [step.module for step, _ in channels if step.bn is None or qualified(step.bn, "weight") not in params]


def _per_input_channel(step, t, flat, channels):
    """``sum`` of the non-negative weight tensor ``t`` of ``step`` over everything but the input channel
    (``channels`` of them; ``flat``: a linear layer reading a flattened ``(C, *spatial)`` tensor)."""
    if isinstance(step, steps.LinearStep):
        return t.sum(0).view(channels, -1).sum(1)
    if isinstance(step, steps.ConvTransposeStep):  # (in, out / groups, *k)
        return t.sum([d for d in range(t.dim()) if d != 0])
    g = step.conv.groups  # (out, in / groups, *k): input channel c = group * (in / groups) + local
    per = t.shape[1]
    return t.view(g, t.shape[0] // g, per, -1).sum((1, 3)).reshape(g * per)


def restrict(scores: dict, names, criterion: str) -> dict:
    """``scores`` of the weights ``names``; an error pointing to ``exclude=`` for those it lacks (weights
    that do not reach the output carry no path)."""
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"weights {missing} do not reach the output: {criterion} cannot score them; leave them "
                         f"out of pruning with exclude=lambda name, weight: name in {set(missing)!r}")
    return {n: scores[n] for n in names}


def wanda_scores(model: nn.Module, names, calibration, *, output=None) -> dict:
    """``|W_ij| rms(x_j) / r(i)`` for the conv/linear weights ``names`` (see the module docstring), from
    one pass of an eval-mode copy of ``model`` over ``calibration``."""
    lifted = lift(model, output)
    rescalable = {step.module for step, _ in rescalable_channels(lifted.plan) if step.bn is None}
    probe = copy.deepcopy(model).eval()
    modules = dict(probe.named_modules())
    sums, hooks = {}, []

    def record(key, t, dim):
        t = t.detach().to(torch.float64)
        dim = dim % t.dim()
        sq = (t * t).sum([d for d in range(t.dim()) if d != dim])
        total, count = sums.get(key, (0, 0))
        sums[key] = (total + sq, count + t.numel() // t.shape[dim])

    def hook(mname, dim):
        def on_forward(mod, args, out):
            record((mname, "in"), args[0], dim)
            if mname in rescalable:
                record((mname, "out"), out, dim)
        return on_forward

    steps_of = {}
    for name in names:
        mname = name.rpartition(".")[0]
        step = steps_of[name] = _step_of(lifted, mname)
        hooks.append(modules[mname].register_forward_hook(hook(mname, step.channel_dim)))
    with torch.no_grad():
        for x, _ in batches(calibration):
            probe(x)
    for h in hooks:
        h.remove()
    out = {}
    weights = dict(model.named_parameters())
    for name in names:
        mname, step = name.rpartition(".")[0], steps_of[name]
        if (mname, "in") not in sums:
            raise ValueError(f"'{mname}' was not called on the calibration data: wanda cannot score it")
        w = weights[name].detach().abs().to(torch.float64)
        step.scale_inputs(w, _rms(sums[(mname, "in")]).to(w.device))
        if mname in rescalable:
            r = _rms(sums[(mname, "out")]).to(w.device)
            w = step.scale_outputs(w, torch.where(r > 0, 1 / r.where(r > 0, torch.ones_like(r)), torch.zeros_like(r)))
        out[name] = w.to(weights[name].dtype)
    return out


def _rms(acc):
    total, count = acc
    return (total / count).sqrt()


def balanced_scores(model, input_shape, pm: dict, *, output=None, dtype=torch.float32) -> dict:
    """``p(w_ij) / sqrt(m(i) m(j))`` for the path-magnitude scores ``pm`` (see the module docstring);
    0 where a channel carries no path (its weights carry none either)."""
    dtype = compute_dtype(dtype)
    lifted = lift(model, output)
    prof = profile(model, lifted, lifted.sample_shape(input_shape), dtype)
    modules = dict(model.named_modules())
    input_mass = _model_input_mass(lifted, pm, modules)
    out = {}
    for name, p in pm.items():
        mname = name.rpartition(".")[0]
        step = _step_of(lifted, mname)
        m_out = prof.channel_loss[step.node].to(torch.float64)
        if step.input in prof.grads:
            m_in = _channel_mass(prof, lifted.plan.output, step.input, step.channel_dim)
        else:
            m_in = input_mass
        rows, cols = _channel_index(modules[mname], p.shape)
        denom = (m_out.cpu()[rows] * m_in.cpu()[cols]).sqrt()
        s = p.detach().cpu().to(torch.float64)
        out[name] = torch.where(denom > 0, s / denom.where(denom > 0, torch.ones_like(denom)),
                                torch.zeros_like(s)).to(p.device)
    return out


def _channel_mass(prof, output, node, channel_dim):
    """``sum F(v) B(v) / ||Phi||_1`` per channel of ``node``, in the units of ``Profile.channel_loss``
    (raw tensors of the pass: their power-of-two exponents cancel in the ratio)."""
    t, g = prof.cache[node].t.detach(), prof.grads[node]
    prod = (t * g).to(torch.float64)
    dim = channel_dim % prod.dim()
    others = [d for d in range(prod.dim()) if d != dim]
    return prod.sum(others) / prof.cache[output].t.detach().sum(dtype=torch.float64)


def _model_input_mass(lifted, pm, modules):
    """Per channel of the model input: ``sum over the edges leaving it of p`` (conservation law), when
    every reader of the input is a scored conv/linear; None otherwise."""
    plan = lifted.plan
    mass = None
    for name, p in pm.items():
        mname = name.rpartition(".")[0]
        step = _step_of(lifted, mname)
        if step.input is not plan.input:
            continue
        rows, cols = _channel_index(modules[mname], p.shape)
        part = torch.zeros(int(cols.max()) + 1, dtype=torch.float64).index_add_(
            0, cols.reshape(-1), p.detach().cpu().to(torch.float64).reshape(-1))
        mass = part if mass is None else mass + part
    return mass


def _channel_index(module, shape):
    """``(output channel, input channel)`` of every element of a conv/linear weight of ``shape``."""
    if isinstance(module, steps.CONV_TRANSPOSE_MODULES):  # (in, out / groups, *k)
        g = module.groups
        cin, per = shape[0], shape[1]
        i = torch.arange(cin).view(-1, 1)
        o = (i // (cin // g)) * per + torch.arange(per).view(1, -1)
        rows, cols = o, i.expand(cin, per)
    else:  # (out, in / groups, *k); linear: (out, in)
        g = getattr(module, "groups", 1)
        cout, per = shape[0], shape[1]
        o = torch.arange(cout).view(-1, 1)
        cols = (o // (cout // g)) * per + torch.arange(per).view(1, -1)
        rows = o.expand(cout, per)
    extra = (1,) * (len(shape) - 2)
    return rows.reshape(rows.shape + extra).expand(shape), cols.reshape(cols.shape + extra).expand(shape)


def fan_out(module) -> int:
    """The outputs one input value reaches through a conv/linear ``module``: output channels (of its
    group) times kernel positions; for a linear layer, its output features."""
    w = module.weight
    kernel = w[0, 0].numel()
    if isinstance(module, steps.CONV_TRANSPOSE_MODULES):  # (in, out / groups, *kernel)
        return int(w.shape[1]) * kernel
    return int(w.shape[0]) // getattr(module, "groups", 1) * kernel


def lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP normalisation of one layer: ``s_k^2 / sum_{l >= k} s_l^2`` with the scores sorted ascending
    (ties in sorted order), in the shape of ``scores``."""
    flat = scores.detach().reshape(-1).to(torch.float64)
    sq, order = (flat * flat).sort()
    tail = sq.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(flat)
    out[order] = torch.where(tail > 0, sq / tail.where(tail > 0, torch.ones_like(tail)), torch.zeros_like(sq))
    return out.view(scores.shape).to(scores.device)


def norm_balanced_parameters(model: nn.Module, output=None, hint="use PathMetricImportance", ratio: float = 1.0) -> dict:
    """``{parameter name: tensor}``: every parameter of ``model`` at the *norm-balanced representative* of
    its rescaling orbit (see ``norm-balanced`` in the module docstring), the model itself untouched.

    For every rescalable hidden channel ``j`` (producer followed by an affine batch-norm), with
    ``||W_:j||_2`` the l2 norm of the input columns of ``j`` in every conv/linear reading it,
    ``lam_j = sqrt(||W_:j||_2 / |gamma_j|)``; the representative has the consumers' columns ``W_:j /
    lam_j``, the batch-norm's ``gamma_j lam_j`` and ``beta_j lam_j`` (the same function, and ``|gamma_j
    lam_j| = ||W_:j / lam_j||_2``), every other parameter as trained (rows of batch-norm-followed layers:
    the gauge the batch-norm fixes; residual streams and the model input: not rescalable). Rescaling ``j``
    by ``mu`` gives ``lam_j mu``, so the representative is the same (bit-identical for powers of two).
    Limits of the orbit: ``W_:j = 0`` gives ``lam_j = 0`` (``gamma_j``, ``beta_j`` and the columns 0);
    ``gamma_j = 0 != W_:j`` gives ``lam_j = inf``: columns 0, ``gamma_j`` 0, ``beta_j`` left as trained
    (its limit is infinite; the only value here that is not invariant). New tensors in each parameter's
    dtype and device (computed in float64). Models where a rescalable layer has no affine batch-norm are
    refused (the error ends with ``hint``: what to use instead). With ``ratio`` ``r`` (``norm-matched``), the
    representative has ``||W_:j / lam_j||_2 = r |gamma_j lam_j|`` instead: ``lam_j = sqrt(||W_:j||_2 /
    (r |gamma_j|))`` (``r = 1``: the balanced one, bit for bit)."""
    params = dict(model.named_parameters())
    channels = rescalable_channels(lift(model, output).plan)
    missing = _without_batchnorm(channels, params)
    if missing:
        raise ValueError(f"the norm-balanced representative needs a batch-norm with affine parameters after every "
                         f"rescalable layer; '{missing[0]}' has none: {hint}")
    rep = {n: p.detach().to(torch.float64).clone() for n, p in params.items()}
    for step, consumers in channels:
        gamma = params[qualified(step.bn, "weight")].detach().abs().to(torch.float64)
        out_sq = torch.zeros_like(gamma)
        for s, flat in consumers:
            w = params[qualified(s.module, "weight")].detach().to(torch.float64)
            out_sq += _per_input_channel(s, w * w, flat, len(gamma))
        norm = out_sq.sqrt()
        one = torch.ones_like(norm)
        if ratio != 1.0:
            gamma = gamma * ratio
        lam = torch.where(gamma > 0, (norm / gamma.where(gamma > 0, one)).sqrt(), torch.where(norm > 0, one, 0 * one))
        inv = torch.where(norm > 0, (gamma / norm.where(norm > 0, one)).sqrt(), 0 * one)
        for s, flat in consumers:
            name = qualified(s.module, "weight")
            s.scale_inputs(rep[name], inv.to(rep[name].device), flat)
        for what in ("weight", "bias"):
            name = qualified(step.bn, what)
            if name in rep:
                rep[name] *= lam.to(rep[name].device)
    return {n: rep[n].to(params[n].dtype) for n in params}
