"""Structured (channel) pruning with torch-pruning at equal MACs removed: the path-metric importance
against torch-pruning's own.

Protocol (issue 10). For each model, importance, scope (``local``: the same fraction of every group's
channels; ``global``: one ranking over all groups) and target fraction of MACs removed (``--macs``,
default 30 % and 50 %), torch-pruning's ``MetaPruner`` removes channels physically at the channel ratio
found by bisection on the MACs actually removed (:func:`prune_to_macs`, counted by torch-pruning's
``count_ops_and_params``), so every importance is compared at the same cost, not at the same ratio.
Then, for every row alike: the batch-norm statistics are re-estimated on the same ``--bn-images``
training images (1,024 by default; ``--no-reestimate-bn`` to skip), and optionally the network is
fine-tuned for ``--finetune-epochs`` on the first ``--train-limit`` training images (the same for every
row). Each row reports MACs and parameters removed, top-1 one-shot, after re-estimation (``top1``) and
after the fine-tune, and the certificate of every evaluated network; the Markdown table ends with the
Spearman correlation, within one model and MACs level, between ``D / ||Phi||`` and the accuracy drop.

Importances: ``norm-balanced`` / ``norm-balanced-max`` / ``norm-balanced-l1``
(:class:`NormBalancedImportance`: torch-pruning's group magnitude importance, ``p=2`` with the group mean,
``p=2`` with the group max, ``p=1`` with the mean, read on the norm-balanced representative of the
rescaling orbit: rescaling-invariant, bit-identical masks after a power-of-two ``random_rescale``),
``path-metric`` (:class:`PathMetricImportance`, exact; with ``sequential=True`` under global ranking, so
that the pruner reaches its ratio), ``path-metric-first-order`` (``exact=False``), ``l1`` / ``l2``
(``MagnitudeImportance(p=1/2)``, group mean), ``l1-max`` / ``l2-max`` (the same with
``group_reduction="max"``: the baselines of ``norm-balanced-max``), ``lamp``, ``bn-scale``, ``taylor``
(gradients of the loss on a few calibration batches of the training data before every ``pruner.step``),
``group-fisher`` (:class:`GroupFisherImportance`: mean square over the same calibration samples of the
loss's derivative with respect to a gate on each channel at all its producers, the frozen shortcuts
included) and ``random`` (a floor). Every one but ``taylor`` and ``group-fisher`` is data-free; those
two are rescaling-invariant too (bit-identical picks after a power-of-two ``random_rescale``).

Committed results (``results/structured/``, README): on ResNet-20 ``norm-balanced-max`` is within 1 point
of the best data-free torch-pruning row at 30 % and 50 % MACs, after re-estimation and after a 1-epoch
fine-tune, but it was chosen among seven variants on that test set; on ResNet-32 (run after the choice)
it is 4-7 points behind L2 / L2-max after re-estimation and within 1 point after the fine-tune (the two
rows measured; against L1 with group max, fine-tuned on ResNet-32 later, it misses at 30 % by 1.4).
``group-fisher`` (data-aware, invariant) is 6-13 points above the best data-free row after the re-estimation in
all four cells (ResNet-20/32, 30/50 %) and within 1 point of it or above after the fine-tune (-0.9 to +2.7);
torch-pruning's ``taylor`` (also invariant) moves by up to 8.5 points with the 256 calibration images drawn.
``path-metric`` is far behind everywhere. ``D / ||Phi||`` ranks the rows weakly (Spearman -0.34 to 0.59
against the accuracy drop).

The certificate. The path-metric between models of different shapes is not defined, so the certified
distance is taken between the original network and the pruned one embedded back into the original
architecture (``certify_pruned``: kept channels hold the pruned network's values, pruned channels are
zero). For pruning alone that copy is *the original with the pruned channels zeroed* (checked: same
weights, outputs equal to ~1e-5) and ``D_relative_masks`` is exact (the zeroed copy is dominated by the
original); after the re-estimation or a fine-tune it is an upper bound (``D_relative``,
``D_relative_finetuned``). Either way ``||R_orig(x) - R_evaluated(x)||_1 <= max(1, ||x||_inf) * D`` on
every input; the largest deviation observed on the data is reported next to it, and one above its bound
is a bug that stops the run.

CIFAR ResNets and their option-A shortcut. torch-pruning's dependency graph does not follow the
shortcut's channel zero-padding (``F.pad`` on the channel dimension): on the original form the graph
couples the wrong channels and the pruned ResNet-20 crashes in its final layer. The models are pruned in
the equivalent form of :func:`to_conv_shortcut`: the shortcut as a frozen 0/1 strided 1x1 convolution
(``weight[o, i] = 1`` iff ``o == i + pad``), which the graph follows like any convolution. The recipe
checks that the conversion keeps the function (outputs equal) and the path-norm (``path_norm`` equal).
These frozen convolutions are in ``ignored_layers`` and are never pruned as layers of their own (never
the root of a group, never scored by torch-pruning's importances, weights kept frozen), but their
channels follow the groups they belong to: pruning channel ``c`` of a residual stream removes row ``c``
of the shortcut that feeds the stream and column ``c`` of the shortcut that reads it, so a pruned
shortcut is still a 0/1 selection (every output one input or zero). :class:`FrozenFollowingPruner` does
this (``MetaPruner`` alone drops every group that touches an ignored layer's output channels, so the
stage-2 and stage-3 residual streams could not be pruned at all). Reported MACs and parameters leave
the frozen convolutions out (in option-A form they are a free slice and pad).

ImageNet ResNet-18/50 (``imagenet:resnet18``, ``imagenet:resnet50``): torchvision models (``--pretrained``
downloads torchvision's weights), data from an ImageFolder ``--imagenet-dir`` (its ``val/`` sub-folder if
present, else the folder itself; ``train/`` for fine-tuning, Taylor calibration and the batch-norm
re-estimation), with the standard resize-256 / center-crop-224 evaluation transform (``--image-size``
scales it).

    python -m pathsaliency.recipes.structured --models resnet20 resnet32 --data test --out out/structured
    python -m pathsaliency.recipes.structured --models imagenet:resnet18 --pretrained --imagenet-dir /data/imagenet
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

import pathsaliency as ps
from pathsaliency import evaluate
from pathsaliency.bound import CertificateViolation, check_bound, rounding_allowance  # noqa: F401 (raised)
from pathsaliency.models.cifar_resnet import ShortcutConv, load_cifar_resnet, to_conv_shortcut

from . import harness
from .cifar10 import cifar10
from .common import as_tensors, markdown_table, predict, reestimate_batchnorm, seed_everything, top1, write_table
from .imagenet import evaluation_data, image_folder, load_model
from .training import finetune, init_distributed
from .unstructured import load_data, outputs

try:
    import torch_pruning as tp
except ImportError as e:  # pragma: no cover
    raise ImportError("pathsaliency.recipes.structured needs torch-pruning: "
                      "pip install 'pathsaliency[torch-pruning]'") from e

from pathsaliency.integrations.torch_pruning import (ChannelTracker, FrozenFollowingPruner, GroupFisherImportance,
                                                     NormBalancedImportance, PathMetricImportance, certify_pruned)

IMPORTANCES = ("norm-balanced", "norm-balanced-max", "norm-balanced-l1", "path-metric", "path-metric-first-order", "l1",
               "l2", "l1-max", "l2-max", "lamp", "bn-scale", "taylor", "group-fisher", "random")
DATA_AWARE = ("taylor", "group-fisher")  # they read the calibration batches
CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56")
IMAGENET_MODELS = ("imagenet:resnet18", "imagenet:resnet50")
COLUMNS = ["model", "importance", "scope", "macs_target", "ratio", "macs_before", "macs_after", "macs_removed",
           "params_before", "params_after", "params_removed", "top1_unpruned", "top1_one_shot", "top1",
           "top1_finetuned", "D_relative_masks", "D_relative", "D_relative_finetuned", "log10_D", "certified_bound",
           "observed_max", "finetuned_certified_bound", "finetuned_observed_max", "zeroed_vs_pruned",
           "bn_reestimated", "seconds"]
MD_COLUMNS = ["model", "importance", "scope", "macs_target", "ratio", "macs_removed", "params_removed",
              "top1_one_shot", "top1", "top1_finetuned", "D_relative_masks", "D_relative", "D_relative_finetuned",
              "certified_bound", "observed_max"]
FORMATS = {"macs_target": ".2f", "ratio": ".3f", "macs_removed": ".3f", "params_removed": ".3f",
           "top1_unpruned": ".2f", "top1_one_shot": ".2f", "top1": ".2f", "top1_finetuned": ".2f",
           "D_relative_masks": ".3g", "D_relative": ".3g", "D_relative_finetuned": ".3g", "log10_D": ".3f",
           "certified_bound": ".3g", "observed_max": ".3g", "zeroed_vs_pruned": ".2g",
           "finetuned_certified_bound": ".3g", "finetuned_observed_max": ".3g", "seconds": ".1f"}


@dataclass
class Config:
    """One run of the structured comparison (every field is a command-line option)."""

    models: Tuple[str, ...] = field(default=("resnet20",), metadata={
        "help": "resnet20 resnet32 (resnet44 resnet56) imagenet:resnet18 imagenet:resnet50"})
    importances: Tuple[str, ...] = field(default=("group-fisher", "norm-balanced-max", "path-metric", "l2", "taylor"), metadata={
        "help": " ".join(IMPORTANCES)})
    macs: Tuple[float, ...] = field(default=(0.3, 0.5), metadata={
        "help": "target fractions of the MACs removed (each importance's channel ratio found by bisection)"})
    macs_tolerance: float = field(default=0.005, metadata={
        "help": "bisection stops once |MACs removed - target| is at most this (else the closest ratio is kept)"})
    bisection_steps: int = field(default=14, metadata={"help": "most pruning trials per row"})
    scope: str = field(default="both", metadata={"help": "local, global or both"})
    iterative_steps: int = 1
    round_to: Optional[int] = field(default=None, metadata={"help": "keep channel counts multiples of this"})
    max_pruning_ratio: float = field(default=1.0, metadata={"help": "cap per layer (global ranking)"})
    data: str = field(default="test", metadata={"help": "CIFAR-10 evaluation data: test, sample or torchvision"})
    limit: Optional[int] = field(default=None, metadata={"help": "use only the first N evaluation images"})
    check_limit: int = field(default=1000, metadata={
        "help": "images on which the certified (embedded) copy is compared with the evaluated model (0: all)"})
    reestimate_bn: bool = field(default=True, metadata={"help": "re-estimate batch-norm statistics after pruning"})
    bn_images: int = field(default=1024, metadata={"help": "training images for the batch-norm re-estimation"})
    finetune_epochs: int = field(default=0, metadata={"help": "fine-tune each pruned model (after re-estimation)"})
    train_limit: Optional[int] = field(default=None, metadata={
        "help": "use only the first N training images (fine-tuning, calibration)"})
    train_data: str = field(default="train", metadata={
        "help": "CIFAR-10 training data: train, or sample = the packaged test sample as a stand-in (tests only)"})
    finetune_lr: float = 0.01
    finetune_batch_size: int = 128
    calib_batches: int = field(default=4, metadata={"help": "batches of training data for the taylor and group-fisher importances"})
    calib_batch_size: int = 64
    imagenet_dir: Optional[str] = field(default=None, metadata={
        "help": "ImageFolder root (val/ and optionally train/) for imagenet:* models"})
    image_size: int = field(default=224, metadata={"help": "imagenet crop size (resize to size*256/224 first)"})
    pretrained: bool = field(default=False, metadata={"help": "torchvision's ImageNet weights (downloads them)"})
    device: str = "cpu"
    workers: int = field(default=2, metadata={"help": "data loader workers (fine-tuning, ImageFolder)"})
    threads: Optional[int] = field(default=None, metadata={
        "help": "torch.set_num_threads (1 is often faster on a small shared machine)"})
    seed: int = 0
    out: str = "out/structured"
    progress: bool = field(default=True, metadata={"help": "progress bars"})


class FunctionMismatch(AssertionError):
    """Two forms of a model that must compute the same function do not: a bug, never a result."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------------
# torch-pruning: importances, frozen layers whose channels follow the group


def frozen_shortcut_convs(model: nn.Module) -> list:
    """The frozen 0/1 convolutions of the :class:`ShortcutConv` shortcuts of ``model``."""
    return [m.conv for m in model.modules() if isinstance(m, ShortcutConv)]


def make_importance(name: str, input_shape, scope: str = "local", calib=()):
    """The importance called ``name``; the path-metric ones rank with :func:`sequential_scores` under
    ``global`` scope (raw single-channel scores let the pruner miss its ratio there); ``group-fisher``
    reads the calibration batches ``calib``."""
    sequential = scope == "global"
    factories = {
        "path-metric": lambda: PathMetricImportance(input_shape, exact=True, sequential=sequential),
        "path-metric-first-order": lambda: PathMetricImportance(input_shape, exact=False, sequential=sequential),
        "norm-balanced": lambda: NormBalancedImportance(p=2),
        "norm-balanced-max": lambda: NormBalancedImportance(p=2, group_reduction="max"),
        "norm-balanced-l1": lambda: NormBalancedImportance(p=1),
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "l1-max": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="max"),
        "l2-max": lambda: tp.importance.MagnitudeImportance(p=2, group_reduction="max"),
        "lamp": tp.importance.LAMPImportance,
        "bn-scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.TaylorImportance,
        "group-fisher": lambda: GroupFisherImportance(list(calib)),
        "random": tp.importance.RandomImportance,
    }
    if name not in factories:
        raise ValueError(f"unknown importance {name!r}; choose from {IMPORTANCES}")
    if name == "group-fisher" and not calib:
        raise ValueError("the group-fisher importance needs calibration batches (training data)")
    return factories[name]()


class ScoreCache(tp.importance.Importance):
    """``importance``'s scores of each group, computed in the first pruning trial of a bisection and reused
    in the later ones: with one pruning step every trial scores a fresh copy of the same unpruned model,
    so only the ratio changes. A group is known by its items (source, handler and target of each
    dependency, and its indices)."""

    def __init__(self, importance):
        self.importance, self.scores = importance, {}

    def __call__(self, group):
        key = tuple((str(dep), tuple(int(i) for i in idxs)) for dep, idxs in group)
        if key not in self.scores:
            self.scores[key] = self.importance(group)
        s = self.scores[key]
        return None if s is None else s.clone()


def check_frozen_selection(model: nn.Module):
    """A pruned shortcut must still be a frozen 0/1 selection: at most one 1 per row and per column."""
    names = {m: n for n, m in model.named_modules()}
    for m in frozen_shortcut_convs(model):
        w = m.weight.detach()
        w = w.reshape(w.shape[0], w.shape[1])
        if not bool(((w == 0) | (w == 1)).all()) or w.sum(1).max() > 1 or w.sum(0).max() > 1:
            raise RuntimeError(f"{names[m]}: the pruned shortcut is no longer a 0/1 selection")
        if m.weight.requires_grad:
            raise RuntimeError(f"{names[m]}: the frozen shortcut became trainable")


# ---------------------------------------------------------------------------------------------------
# Models and data


@dataclass
class Spec:
    """One model of the comparison: the network to prune, its data, and what is ignored.

    ``data``: evaluation data as :func:`pathsaliency.recipes.unstructured.outputs` takes it (an ``(X, Y)``
    pair or a DataLoader); ``train_data``: an augmented training dataset (fine-tuning, Taylor calibration)
    or None; ``bn_X``: the images of the batch-norm re-estimation (None: not re-estimated)."""

    name: str
    model: nn.Module
    input_shape: tuple
    ignored: list
    frozen: list
    data: object
    train_data: object
    bn_X: Optional[torch.Tensor]
    note: str = ""


def head(data, n):
    """The first ``n`` samples of evaluation ``data`` (all of them for ``n`` None or 0)."""
    if isinstance(data, tuple):
        return data if not n else (data[0][:n], data[1][:n])
    if not n or n >= len(data.dataset):
        return data
    return torch.utils.data.DataLoader(torch.utils.data.Subset(data.dataset, range(n)), batch_size=data.batch_size,
                                       num_workers=data.num_workers)


def imagenet_data(root, image_size=224, limit=None, train_limit=None):
    """``(eval dataset, train dataset or None, its un-augmented view or None)`` from an ImageFolder root
    (``val/`` and ``train/`` sub-folders if present, else the root itself for evaluation, no training data)."""
    root = Path(root)
    ev = image_folder(root, "val", image_size, False, limit) if (root / "val").is_dir() else \
        image_folder(root.parent, root.name, image_size, False, limit)
    if not (root / "train").is_dir():
        return ev, None, None
    return ev, image_folder(root, "train", image_size, True, train_limit), image_folder(root, "train", image_size)


def check_conversion(original, converted, input_shape, X, what):
    """The conv-shortcut form must compute the same function and have the same path-norm."""
    with torch.no_grad():
        a, b = predict(original.eval(), X), predict(converted.eval(), X)
    diff = float((a - b).abs().max())
    na = ps.path_norm(original, input_shape, dtype=torch.float64)
    nb = ps.path_norm(converted, input_shape, dtype=torch.float64)
    if diff > 1e-5 * (1.0 + float(a.abs().max())) or abs(na.log2 - nb.log2) > 1e-9:
        raise FunctionMismatch(f"{what}: the conv-shortcut form differs (outputs by {diff:.3g}, log2 path-norm "
                               f"{na.log2:.12g} vs {nb.log2:.12g})")
    return {"max_output_difference": diff, "log10_path_norm": na.log10, "log10_path_norm_converted": nb.log10}


def _first_images(dataset, n):
    return as_tensors(torch.utils.data.Subset(dataset, range(min(n, len(dataset)))))[0]


_DATA_CACHE: dict = {}  # the decoded CIFAR-10 evaluation set, shared by the models of one run


def load_spec(name, c: Config, log=print) -> Spec:
    """Build the :class:`Spec` of ``name`` (a CIFAR ResNet or ``imagenet:resnet18/50``) for the run ``c``."""
    bn_n = c.bn_images if c.reestimate_bn else 0
    if name in CIFAR_MODELS:
        key = (c.data, c.limit)
        if key not in _DATA_CACHE:
            _DATA_CACHE.clear()
            _DATA_CACHE[key] = load_data(c.data, c.limit, c.progress)
        X, Y = _DATA_CACHE[key]
        original = load_cifar_resnet(name)
        model = to_conv_shortcut(original).eval()
        info = check_conversion(original, model, (3, 32, 32), X[:500], name)
        note = (f"{name}: conv-shortcut form checked: outputs differ by {info['max_output_difference']:.2g}, "
                f"path-norm 10^{info['log10_path_norm']:.6f} before and 10^{info['log10_path_norm_converted']:.6f} "
                "after")
        log(note)
        if c.train_data == "sample":
            train = cifar10("test", source="sample", limit=c.train_limit, augment=True)
            bn_X = _first_images(cifar10("test", source="sample"), bn_n) if bn_n else None
            log(f"{name}: using the packaged TEST sample as stand-in training data ({len(train)} images)")
        else:
            train = cifar10("train", augment=True, limit=c.train_limit)
            bn_X = as_tensors(cifar10("train", limit=bn_n))[0] if bn_n else None
        return Spec(name, model, (3, 32, 32), [model.linear], frozen_shortcut_convs(model), (X, Y), train, bn_X, note)
    if name in IMAGENET_MODELS:
        if c.imagenet_dir is None:
            raise ValueError(f"{name} needs --imagenet-dir (an ImageFolder, with val/ and optionally train/)")
        torch.manual_seed(c.seed)
        model = load_model(name.split(":", 1)[1], c.pretrained)
        ev, train, train_eval = imagenet_data(c.imagenet_dir, c.image_size, c.limit, c.train_limit)
        if bn_n and train_eval is None:
            raise ValueError(f"{name}: the batch-norm re-estimation needs {c.imagenet_dir}/train/ "
                             "(or pass --no-reestimate-bn)")
        note = f"{name}: {'torchvision weights' if c.pretrained else 'random weights (seeded)'}, {len(ev)} images"
        log(note)
        data = evaluation_data(ev, batch_size=64, workers=c.workers)
        return Spec(name, model, (3, c.image_size, c.image_size), [model.fc], [], data, train,
                    _first_images(train_eval, bn_n) if bn_n else None, note)
    raise ValueError(f"unknown model {name!r}; choose from {CIFAR_MODELS + IMAGENET_MODELS}")


def calibration_batches(dataset, n_batches, batch_size):
    """The first ``n_batches * batch_size`` samples of ``dataset`` as fixed batches (Taylor gradients)."""
    if dataset is None or n_batches <= 0:
        return []
    n = min(len(dataset), n_batches * batch_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    return [(x, torch.as_tensor(y)) for x, y in loader]


def accumulate_gradients(model, batches, device="cpu"):
    """``loss.backward()`` on each calibration batch (eval mode: batch-norm statistics untouched)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        loss_fn(model(x.to(device)), y.to(device)).backward()


# ---------------------------------------------------------------------------------------------------
# Costs


def costs(model, input_shape, frozen=(), device="cpu"):
    """``(MACs, parameters)`` of ``model`` for one sample (torch-pruning's counter), without the frozen
    0/1 shortcut convolutions (a free slice and pad in option-A form)."""
    example = torch.zeros(1, *input_shape, device=device)
    macs, params = tp.utils.count_ops_and_params(model, example)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, o.shape)) for m in frozen]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    for m in frozen:
        n = m.weight.numel()
        macs -= n * shapes[m][-1] * shapes[m][-2]
        params -= n
    return int(macs), int(params)


# ---------------------------------------------------------------------------------------------------
# Pruning at a channel ratio, and at a target of MACs removed


def prune(spec: Spec, importance: str, scope: str, ratio: float, c: Config = Config(), calib=(), scores=None):
    """Prune a copy of ``spec.model`` at channel ``ratio`` (the torch seed reset to ``c.seed`` first, so
    the random importance draws the same scores at every ratio); returns ``(pruned model, ChannelTracker)``.
    ``scores``: the torch-pruning importance object to use (default: ``make_importance(importance)``)."""
    torch.manual_seed(c.seed)
    model = copy.deepcopy(spec.model).to(c.device).eval()
    names = {m: n for n, m in model.named_modules()}
    index = {n: m for n, m in model.named_modules()}
    frozen = [index[n] for n, m in spec.model.named_modules() if any(m is f for f in spec.frozen)]
    ignored = [index[n] for n, m in spec.model.named_modules() if any(m is i for i in spec.ignored)]
    pruner = FrozenFollowingPruner(
        model, torch.zeros(1, *spec.input_shape, device=c.device),
        scores if scores is not None else make_importance(importance, spec.input_shape, scope, calib),
        frozen_layers=frozen, ignored_layers=ignored,
        scoring_frozen=importance.startswith("path-metric") or importance == "group-fisher",
        global_pruning=(scope == "global"), pruning_ratio=ratio, iterative_steps=c.iterative_steps,
        round_to=c.round_to, max_pruning_ratio=c.max_pruning_ratio)
    tracker = ChannelTracker(model)
    for _ in range(c.iterative_steps):
        if importance == "taylor":
            if not calib:
                raise ValueError("the taylor importance needs calibration batches (training data)")
            accumulate_gradients(model, calib, c.device)
        for group in pruner.step(interactive=True):
            tracker.record(group, names)
            group.prune()
        pruner.freeze()
    model.zero_grad(set_to_none=True)
    tracker.check(model)
    check_frozen_selection(model)
    return model.eval(), tracker


@dataclass
class Pruned:
    """What :func:`prune_to_macs` found: the pruned model, its channel record, the ratio and its costs."""

    model: nn.Module
    tracker: ChannelTracker
    ratio: float
    macs: int
    params: int
    macs_removed: float


def prune_to_macs(spec: Spec, importance: str, scope: str, target: float, c: Config = Config(), calib=(),
                  macs0=None) -> Pruned:
    """The pruned model whose fraction of MACs removed, ``1 - MACs(pruned) / MACs(spec.model)``, is
    closest to ``target``: bisection on the channel ratio in ``[0, 1)`` (the MACs removed grow with
    it), stopped once within ``c.macs_tolerance`` or after ``c.bisection_steps`` trials. With one pruning
    step the importance is computed once (:class:`ScoreCache`)."""
    if not 0 < target < 1:
        raise ValueError(f"the target fraction of MACs removed must be in (0, 1), got {target}")
    if macs0 is None:
        macs0 = costs(spec.model, spec.input_shape, spec.frozen, c.device)[0]
    scores = ScoreCache(make_importance(importance, spec.input_shape, scope, calib)) if c.iterative_steps == 1 else None
    lo, hi, best = 0.0, 1.0, None
    for _ in range(max(1, c.bisection_steps)):
        ratio = (lo + hi) / 2
        model, tracker = prune(spec, importance, scope, ratio, c, calib, scores)
        macs, params = costs(model, spec.input_shape, frozen_shortcut_convs(model), c.device)
        trial = Pruned(model, tracker, ratio, macs, params, 1 - macs / macs0)
        if best is None or abs(trial.macs_removed - target) < abs(best.macs_removed - target):
            best = trial
        if abs(trial.macs_removed - target) <= c.macs_tolerance:
            break
        lo, hi = (ratio, hi) if trial.macs_removed < target else (lo, ratio)
    return best


# ---------------------------------------------------------------------------------------------------
# The certificate of an evaluated network


def _relative_difference(a, b):
    return float((a - b).abs().max()) / (1.0 + float(a.abs().max()))


def certificate(spec: Spec, pruned: Pruned, evaluated: nn.Module, logits, ref, *, check, what, device="cpu"):
    """``(D, bound, observed, difference)`` of ``evaluated`` (``pruned.model``, possibly re-estimated or
    fine-tuned; ``logits``: its outputs on ``spec.data``) against ``spec.model`` (``ref``: its ``(logits,
    labels, input bounds)``). ``D`` comes from :func:`certify_pruned`, after checking on the ``check`` data
    that the embedded copy computes what ``evaluated`` does (``difference``, relative: at most 1e-5, else
    :class:`FunctionMismatch`); the bound is checked on every sample (:class:`CertificateViolation`)."""
    embedded = pruned.tracker.embedded(spec.model, evaluated).eval()
    e_logits = outputs(embedded, check, device)[0]
    diff = _relative_difference(e_logits, logits[:len(e_logits)])
    if diff > 1e-5:
        raise FunctionMismatch(f"{what}: the embedded copy and the evaluated model differ by {diff:.3g} (relative)")
    d = certify_pruned(spec.model, evaluated, pruned.tracker, spec.input_shape)
    bound = ref[2] * d.value
    observed = evaluate.deviation(ref[0], logits)
    check_bound(observed, bound, rounding_allowance(ref[0], logits), what=what)
    return d, bound, observed, diff


# ---------------------------------------------------------------------------------------------------
# One row, and the run


def evaluate_row(spec: Spec, importance: str, scope: str, target: float, c: Config, ref, calib, costs0) -> dict:
    """Prune ``spec.model`` to ``target`` MACs removed, re-estimate, fine-tune, certify: one row."""
    t0 = time.perf_counter()
    what = f"{spec.name} {importance} {scope} {target:.0%} MACs"
    macs0, params0 = costs0
    p = prune_to_macs(spec, importance, scope, target, c, calib, macs0)
    check = head(spec.data, c.check_limit)
    # pruning alone: the embedded copy is the original with the pruned channels zeroed (exact D)
    zeroed = p.tracker.zeroed(spec.model)
    for (k, a), b in zip(zeroed.state_dict().items(), p.tracker.embedded(spec.model, p.model).state_dict().values()):
        if not torch.equal(a, b):
            raise FunctionMismatch(f"{what}: the zeroed copy and the pruned weights disagree at {k}")
    logits = outputs(p.model, spec.data, c.device)[0]
    d_masks, bound, observed, zero_diff = certificate(spec, p, p.model, logits, ref, check=check, what=what,
                                                      device=c.device)
    if not d_masks.exact:
        raise FunctionMismatch(f"{what}: the zeroed copy is not dominated by the original")
    one_shot = top1(logits, ref[1])
    evaluated, d = p.model, d_masks
    if spec.bn_X is not None:
        evaluated = reestimate_batchnorm(p.model, spec.bn_X.to(c.device))
        logits = outputs(evaluated, spec.data, c.device)[0]
        d, bound, observed, _ = certificate(spec, p, evaluated, logits, ref, check=check,
                                            what=what + " re-estimated", device=c.device)
    row = {"model": spec.name, "importance": importance, "scope": scope, "macs_target": target, "ratio": p.ratio,
           "macs_before": macs0, "macs_after": p.macs, "macs_removed": p.macs_removed, "params_before": params0,
           "params_after": p.params, "params_removed": 1 - p.params / params0, "top1_unpruned": top1(ref[0], ref[1]),
           "top1_one_shot": one_shot, "top1": top1(logits, ref[1]), "top1_finetuned": "",
           "D_relative_masks": d_masks.relative, "D_relative": d.relative, "D_relative_finetuned": "",
           "log10_D": d.log10, "certified_bound": float(bound.max()), "observed_max": float(observed.max()),
           "finetuned_certified_bound": "", "finetuned_observed_max": "", "zeroed_vs_pruned": zero_diff,
           "bn_reestimated": spec.bn_X is not None}
    if c.finetune_epochs > 0:
        if spec.train_data is None:
            raise ValueError(f"{spec.name}: fine-tuning needs training data")
        tuned = finetune(copy.deepcopy(evaluated), spec.train_data, c.finetune_epochs, lr=c.finetune_lr,
                         batch_size=c.finetune_batch_size, device=c.device, workers=c.workers, seed=c.seed,
                         progress=c.progress)
        check_frozen_selection(tuned)
        ft_logits = outputs(tuned, spec.data, c.device)[0]
        d_ft, ft_bound, ft_observed, _ = certificate(spec, p, tuned, ft_logits, ref, check=check,
                                                     what=what + " fine-tuned", device=c.device)
        row.update(top1_finetuned=top1(ft_logits, ref[1]), D_relative_finetuned=d_ft.relative,
                   finetuned_certified_bound=float(ft_bound.max()), finetuned_observed_max=float(ft_observed.max()))
    row["seconds"] = time.perf_counter() - t0
    return row


def run(config: Config = Config(), log=None):
    """Run the comparison; returns the rows (also written to ``config.out`` as CSV, Markdown, JSON, PNG)."""
    c = config
    log = log or (print if is_main_process() else (lambda *_: None))
    for imp in c.importances:
        if imp not in IMPORTANCES:
            raise ValueError(f"unknown importance {imp!r}; choose from {IMPORTANCES}")
    if c.scope not in ("local", "global", "both"):
        raise ValueError(f"scope must be local, global or both, got {c.scope!r}")
    seed_everything(c.seed)
    init_distributed(c.device)  # under torchrun every rank prunes: the exact importance shards its removal passes
    scopes = ("local", "global") if c.scope == "both" else (c.scope,)
    rows, notes = [], []
    for name in c.models:
        spec = load_spec(name, c, log)
        notes.append(spec.note)
        spec.model.to(c.device)
        ref = outputs(spec.model, spec.data, c.device)
        costs0 = costs(spec.model, spec.input_shape, spec.frozen, c.device)
        line = (f"{name}: unpruned top-1 {top1(ref[0], ref[1]):.2f}% on {len(ref[1])} images, "
                f"{costs0[0] / 1e6:.2f} M MACs, {costs0[1] / 1e6:.3f} M parameters")
        notes.append(line)
        log(line)
        calib = calibration_batches(spec.train_data, c.calib_batches, c.calib_batch_size) \
            if any(imp in DATA_AWARE for imp in c.importances) else []
        for target in c.macs:
            for imp in c.importances:
                for sc in scopes:
                    r = evaluate_row(spec, imp, sc, target, c, ref, calib, costs0)
                    rows.append(r)
                    ft = f", fine-tuned {r['top1_finetuned']:.2f}%" if c.finetune_epochs > 0 else ""
                    log(f"  {imp:24s} {sc:6s} target {target:.0%}: ratio {r['ratio']:.3f}, MACs "
                        f"-{r['macs_removed']:.1%}, top-1 {r['top1_one_shot']:.2f}% one-shot, {r['top1']:.2f}%{ft}, "
                        f"D/||Phi|| {r['D_relative_masks']:.3g} (masks) {r['D_relative']:.3g}, observed "
                        f"{r['observed_max']:.3g} <= {r['certified_bound']:.3g} ({r['seconds']:.1f} s)")
    if not is_main_process():
        return rows
    write_results(rows, notes, c, len(ref[1]))
    log(f"wrote {Path(c.out) / 'structured'}.csv/.md/.json/.png")
    return rows


def write_results(rows, notes, c: Config, n_images):
    """``structured.{csv,json,md,png}`` under ``c.out``; the Markdown table ends with the notes and the
    rank agreement of the certificate with the accuracy drop within each model and MACs level."""
    out = Path(c.out)
    desc = c.data if all(m in CIFAR_MODELS for m in c.models) else "imagenet"
    bn = f"batch-norm re-estimated on {c.bn_images} training images" if c.reestimate_bn else "no re-estimation"
    title = (f"Structured pruning at equal MACs removed (torch-pruning MetaPruner), {desc}, {n_images} images, "
             f"{bn}, fine-tune {c.finetune_epochs} epoch(s)")
    paths = write_table(rows, out, "structured", title, COLUMNS, FORMATS)
    tuned = c.finetune_epochs > 0
    md_columns = [col for col in MD_COLUMNS if tuned or not col.endswith("finetuned")]
    md = markdown_table(rows, md_columns, FORMATS, title)
    md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n" + (
        "- macs/params: torch-pruning's count_ops_and_params without the frozen 0/1 shortcut convolutions; "
        "ratio: the channel ratio the bisection found for macs_target; top1_one_shot: before the re-estimation; "
        "D_relative_masks: exact path-metric lost by the pruning alone / ||Phi(original)||_1; D_relative: the "
        "same for the evaluated network (top1); certified_bound: max over the data of max(1, ||x||_inf) * D; "
        "observed_max: max over the data of ||R_orig(x) - R_evaluated(x)||_1. All columns in structured.csv.\n")
    md += ("\nSpearman rank correlation, within one model and MACs level, between D / ||Phi|| and the top-1 drop "
           "(1 = the certificate orders the rows exactly as accuracy does):\n\n")
    md += harness.rank_agreement(rows, ("model", "macs_target"), ("D_relative_masks", "D_relative"),
                                 formats={"macs_target": ".0%"})
    if tuned:
        md += "\nAfter the fine-tune:\n\n" + harness.rank_agreement(
            rows, ("model", "macs_target"), ("D_relative_masks", "D_relative_finetuned"), accuracy="top1_finetuned",
            formats={"macs_target": ".0%"})
    paths["md"].write_text(md)
    plot(rows, out / "structured.png", title)


def plot(rows, path, subtitle=""):
    """Per model: top-1 against the fraction of MACs removed, one panel per scope (solid: after the
    re-estimation, dashed: after the fine-tune), and top-1 against the certified ``D / ||Phi||`` of the
    masks (every row; the certificate ranks the rows well when this falls from left to right)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    scopes = list(dict.fromkeys(r["scope"] for r in rows))
    colors = {imp: f"C{k}" for k, imp in enumerate(dict.fromkeys(r["importance"] for r in rows))}
    tuned = any(r["top1_finetuned"] != "" for r in rows)
    fig, axes = harness.figure(len(models), len(scopes) + 1, panel=(5.0, 4.0))
    for i, m in enumerate(models):
        mine = [r for r in rows if r["model"] == m]
        for j, sc in enumerate(scopes):
            ax = axes[i][j]
            ax.axhline(mine[0]["top1_unpruned"], color="gray", lw=0.8, ls=":", label="unpruned")
            for imp, color in colors.items():
                pts = sorted((100 * r["macs_removed"], r["top1"], r["top1_finetuned"]) for r in mine
                             if r["importance"] == imp and r["scope"] == sc)
                if not pts:
                    continue
                style = dict(color=color, lw=2.2 if imp.startswith("path-metric") else 1.2)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=imp, **style)
                if tuned:
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", **style)
            harness.label(ax, f"{m}, {sc} ranking" + (" (dashed: fine-tuned)" if tuned else ""), "MACs removed (%)",
                          "top-1 (%)")
        ax = axes[i][-1]
        markers = dict(zip(dict.fromkeys(r["macs_target"] for r in mine), "os^Dv"))
        for r in mine:
            ax.scatter([r["D_relative_masks"]], [r["top1"]], color=colors[r["importance"]],
                       marker=markers[r["macs_target"]], facecolors="none" if r["scope"] == "local" else None)
        for t, mk in markers.items():
            ax.scatter([], [], color="gray", marker=mk, label=f"{t:.0%} MACs removed")
        ax.scatter([], [], facecolors="none", edgecolors="gray", marker="o", label="local (filled: global)")
        harness.label(ax, f"{m}: certificate vs accuracy (colours as left)", "D / ||Phi||_1 of the masks", "top-1 (%)")
    harness.save(fig, path, subtitle)


def main(argv=None):
    return harness.main(Config, run, argv, prog="python -m pathsaliency.recipes.structured", description=__doc__,
                        choices={"models": list(CIFAR_MODELS + IMAGENET_MODELS), "importances": list(IMPORTANCES),
                                 "scope": ["local", "global", "both"], "data": ["test", "sample", "torchvision"],
                                 "train_data": ["train", "sample"]})


if __name__ == "__main__":
    main()
