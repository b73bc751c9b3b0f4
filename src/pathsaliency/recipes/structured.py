"""Structured (channel) pruning with torch-pruning: the path-metric importance against torch-pruning's own.

For each model, importance, scope (local / global ranking) and channel ratio, torch-pruning's
``MetaPruner`` removes channels physically (``pruning_ratio`` of the channels of every group, or of all
groups together for ``global``); each row reports MACs and parameters before and after, top-1 before and
after an optional short fine-tune, and the certificate of what pruning cost.

Importances: ``path-metric`` (:class:`PathMetricImportance`, exact), ``path-metric-first-order``
(``exact=False``), ``l1`` / ``l2`` (``MagnitudeImportance(p=1/2)``), ``lamp``, ``bn-scale``, ``taylor``
(gradients of the loss on a few calibration batches of the training data before every ``pruner.step``)
and ``random`` (a floor).

The certificate. The path-metric between models of different shapes is not defined, so the certified
distance is taken between the original network and *the original with the pruned channels zeroed*
(same architecture: every pruned output channel's weights, bias and batch-norm entries, and every
pruned input channel's weights, set to zero). That copy computes the same function as the physically
pruned model (checked on the data: outputs equal to ~1e-5), so ``D = path_metric(original, zeroed)``
(exact: the zeroed copy is dominated by the original) bounds the pruned model too:
``||R_orig(x) - R_pruned(x)||_1 <= max(1, ||x||_inf) * D`` on every input. The largest deviation
observed on the data is reported next to it; one above its bound is a bug and stops the run. After a
fine-tune, the pruned weights are written back into the original shapes (zeros elsewhere) and the
(non-exact) certified distance of the fine-tuned model is reported the same way.

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
present, else the folder itself; ``train/`` for fine-tuning and Taylor calibration when present), with the
standard resize-256 / center-crop-224 evaluation transform (``--image-size`` scales it).

    python -m pathsaliency.recipes.structured --models resnet20 resnet32 --data test --out out/structured
    python -m pathsaliency.recipes.structured --models imagenet:resnet18 --pretrained --imagenet-dir /data/imagenet
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

import pathsaliency as ps
from pathsaliency.models.cifar_resnet import ShortcutConv, load_cifar_resnet, to_conv_shortcut

from .cifar10 import cifar10
from .common import deviation, markdown_table, predict, seed_everything, top1, write_table
from .imagenet import image_folder
from .training import finetune, init_distributed
from .unstructured import CertificateViolation, check_bound, load_data  # noqa: F401 (CertificateViolation: raised)

try:
    import torch_pruning as tp
except ImportError as e:  # pragma: no cover
    raise ImportError("pathsaliency.recipes.structured needs torch-pruning: "
                      "pip install 'pathsaliency[torch-pruning]'") from e

from pathsaliency.integrations.torch_pruning import ChannelTracker, FrozenFollowingPruner, PathMetricImportance

IMPORTANCES = ("path-metric", "path-metric-first-order", "l1", "l2", "lamp", "bn-scale", "taylor", "random")
CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56")
IMAGENET_MODELS = ("imagenet:resnet18", "imagenet:resnet50")
COLUMNS = ["model", "importance", "scope", "ratio", "macs_before", "macs_after", "macs_removed", "params_before",
           "params_after", "params_removed", "top1_unpruned", "top1", "top1_finetuned", "D_relative", "log10_D",
           "certified_bound", "observed_max", "zeroed_vs_pruned", "finetuned_certified_bound",
           "finetuned_observed_max", "seconds"]
MD_COLUMNS = ["model", "importance", "scope", "ratio", "macs_removed", "params_removed", "top1", "top1_finetuned",
              "D_relative", "certified_bound", "observed_max"]
FORMATS = {"ratio": ".2f", "macs_removed": ".3f", "params_removed": ".3f", "top1_unpruned": ".2f", "top1": ".2f",
           "top1_finetuned": ".2f", "D_relative": ".3g", "log10_D": ".3f", "certified_bound": ".3g",
           "observed_max": ".3g", "zeroed_vs_pruned": ".2g", "finetuned_certified_bound": ".3g",
           "finetuned_observed_max": ".3g", "seconds": ".1f"}


class FunctionMismatch(AssertionError):
    """Two forms of a model that must compute the same function do not: a bug, never a result."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------------
# torch-pruning: frozen layers whose channels follow the group


def frozen_shortcut_convs(model: nn.Module) -> list:
    """The frozen 0/1 convolutions of the :class:`ShortcutConv` shortcuts of ``model``."""
    return [m.conv for m in model.modules() if isinstance(m, ShortcutConv)]


def make_importance(name: str, input_shape):
    if name == "path-metric":
        return PathMetricImportance(input_shape, exact=True)
    if name == "path-metric-first-order":
        return PathMetricImportance(input_shape, exact=False)
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "lamp":
        return tp.importance.LAMPImportance()
    if name == "bn-scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown importance {name!r}; choose from {IMPORTANCES}")


def check_frozen_selection(model: nn.Module, names: dict):
    """A pruned shortcut must still be a 0/1 selection: at most one 1 per row and per column."""
    for m in frozen_shortcut_convs(model):
        w = m.weight.detach()
        w = w.reshape(w.shape[0], w.shape[1])
        if not bool(((w == 0) | (w == 1)).all()) or w.sum(1).max() > 1 or w.sum(0).max() > 1:
            raise RuntimeError(f"{names.get(m, '?')}: the pruned shortcut is no longer a 0/1 selection")
        if m.weight.requires_grad:
            raise RuntimeError(f"{names.get(m, '?')}: the frozen shortcut became trainable")


# ---------------------------------------------------------------------------------------------------
# Models and data


class Spec:
    """One model of the comparison: the network to prune, how to read its data, and what is ignored."""

    def __init__(self, name, model, input_shape, ignored, frozen, data, train_data, note=""):
        self.name, self.model, self.input_shape = name, model, tuple(input_shape)
        self.ignored, self.frozen = ignored, frozen
        self.data, self.train_data, self.note = data, train_data, note


class Batches:
    """Evaluation data as ``(x, y)`` batches: decoded tensors (CIFAR) or a DataLoader (ImageFolder)."""

    def __init__(self, X=None, Y=None, dataset=None, batch_size=250, workers=0):
        self.X, self.Y, self.dataset = X, Y, dataset
        self.batch_size, self.workers = batch_size, workers

    def __len__(self):
        return len(self.X) if self.X is not None else len(self.dataset)

    def __iter__(self):
        if self.X is not None:
            for i in range(0, len(self.X), self.batch_size):
                yield self.X[i:i + self.batch_size], self.Y[i:i + self.batch_size]
        else:
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers)
            for x, y in loader:
                yield x, torch.as_tensor(y)

    def head(self, n):
        """The first ``n`` samples (all of them for ``n`` None or 0)."""
        if not n or n >= len(self):
            return self
        if self.X is not None:
            return Batches(self.X[:n], self.Y[:n], batch_size=self.batch_size)
        return Batches(dataset=torch.utils.data.Subset(self.dataset, range(n)), batch_size=self.batch_size,
                       workers=self.workers)


@torch.no_grad()
def outputs(model, batches, device="cpu"):
    """``(logits, labels, max(1, ||x||_inf) per sample)`` of ``model`` (in eval mode) on ``batches``."""
    model.eval()
    logits, labels, xb = [], [], []
    for x, y in batches:
        logits.append(model(x.to(device)).double().cpu())
        labels.append(y)
        xb.append(x.reshape(len(x), -1).abs().amax(1).double().clamp_min(1.0))
    return torch.cat(logits), torch.cat(labels), torch.cat(xb)


def imagenet_data(root, image_size=224, limit=None, train_limit=None):
    """``(eval dataset, train dataset or None)`` from an ImageFolder root (``val/`` and ``train/``
    sub-folders if present, else the root itself for evaluation and no training data)."""
    root = Path(root)
    ev = image_folder(root, "val", image_size, False, limit) if (root / "val").is_dir() else \
        image_folder(root.parent, root.name, image_size, False, limit)
    train = image_folder(root, "train", image_size, True, train_limit) if (root / "train").is_dir() else None
    return ev, train


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


_DATA_CACHE: dict = {}  # the decoded CIFAR-10 evaluation set, shared by the models of one run


def load_spec(name, *, data="sample", limit=None, train_data="train", train_limit=None, imagenet_dir=None,
              image_size=224, pretrained=False, seed=0, progress=False, log=print, eval_batch_size=250, workers=0):
    """Build the :class:`Spec` of ``name`` (a CIFAR ResNet or ``imagenet:resnet18/50``)."""
    if name in CIFAR_MODELS:
        key = (data, limit)
        if key not in _DATA_CACHE:
            _DATA_CACHE.clear()
            _DATA_CACHE[key] = load_data(data, limit, progress)
        X, Y = _DATA_CACHE[key]
        original = load_cifar_resnet(name)
        model = to_conv_shortcut(original).eval()
        info = check_conversion(original, model, (3, 32, 32), X[:500], name)
        note = (f"{name}: conv-shortcut form checked: outputs differ by {info['max_output_difference']:.2g}, "
                f"path-norm 10^{info['log10_path_norm']:.6f} before and 10^{info['log10_path_norm_converted']:.6f} "
                "after")
        log(note)
        if train_data == "sample":
            train = cifar10("test", source="sample", limit=train_limit, augment=True)
            log(f"{name}: using the packaged TEST sample as stand-in training data ({len(train)} images)")
        else:
            train = cifar10("train", augment=True, limit=train_limit)
        return Spec(name, model, (3, 32, 32), [model.linear], frozen_shortcut_convs(model),
                    Batches(X, Y, batch_size=eval_batch_size), train, note)
    if name in IMAGENET_MODELS:
        import torchvision

        if imagenet_dir is None:
            raise ValueError(f"{name} needs --imagenet-dir (an ImageFolder, with val/ and optionally train/)")
        arch = name.split(":", 1)[1]
        torch.manual_seed(seed)
        weights = "DEFAULT" if pretrained else None
        model = getattr(torchvision.models, arch)(weights=weights).eval()
        ev, train = imagenet_data(imagenet_dir, image_size, limit, train_limit)
        note = f"{name}: {'torchvision weights' if pretrained else 'random weights (seeded)'}, {len(ev)} images"
        log(note)
        return Spec(name, model, (3, image_size, image_size), [model.fc], [],
                    Batches(dataset=ev, batch_size=eval_batch_size, workers=workers), train, note)
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
# One pruning run


def prune(spec: Spec, importance: str, scope: str, ratio: float, *, iterative_steps=1, round_to=None,
          max_pruning_ratio=1.0, calib=(), device="cpu"):
    """Prune a copy of ``spec.model``; returns ``(pruned model, ChannelTracker)``."""
    model = copy.deepcopy(spec.model).to(device).eval()
    names = {m: n for n, m in model.named_modules()}
    index = {n: m for n, m in model.named_modules()}
    frozen = [index[n] for n, m in spec.model.named_modules() if any(m is f for f in spec.frozen)]
    ignored = [index[n] for n, m in spec.model.named_modules() if any(m is i for i in spec.ignored)]
    imp = make_importance(importance, spec.input_shape)
    pruner = FrozenFollowingPruner(
        model, torch.zeros(1, *spec.input_shape, device=device), imp, frozen_layers=frozen, ignored_layers=ignored,
        scoring_frozen=importance.startswith("path-metric"), global_pruning=(scope == "global"),
        pruning_ratio=ratio, iterative_steps=iterative_steps, round_to=round_to, max_pruning_ratio=max_pruning_ratio)
    tracker = ChannelTracker(model)
    for _ in range(iterative_steps):
        if importance == "taylor":
            if not calib:
                raise ValueError("the taylor importance needs calibration batches (training data)")
            accumulate_gradients(model, calib, device)
        for group in pruner.step(interactive=True):
            tracker.record(group, names)
            group.prune()
        pruner.freeze()
    model.zero_grad(set_to_none=True)
    tracker.check(model)
    check_frozen_selection(model, names)
    return model.eval(), tracker


def _relative_difference(a, b):
    return float((a - b).abs().max()) / (1.0 + float(a.abs().max()))


def run(models=("resnet20",), data="sample", importances=("path-metric", "l1", "taylor"), ratios=(0.2, 0.4, 0.6),
        scope="both", iterative_steps=1, round_to=None, max_pruning_ratio=1.0, seed=0, out="out/structured",
        limit=None, finetune_epochs=0, train_limit=None, train_data="train", finetune_lr=0.01,
        finetune_batch_size=128, calib_batches=4, calib_batch_size=64, check_limit=1000, imagenet_dir=None,
        image_size=224, pretrained=False, device="cpu", workers=2, progress=True, log=print):
    """Run the comparison; returns the rows (also written to ``out`` as CSV, Markdown, JSON and PNG)."""
    seed_everything(seed)
    init_distributed(device)  # under torchrun every rank prunes: the exact importance shards its removal passes
    out = Path(out)
    scopes = ("local", "global") if scope == "both" else (scope,)
    for imp in importances:
        if imp not in IMPORTANCES:
            raise ValueError(f"unknown importance {imp!r}; choose from {IMPORTANCES}")
    rows, notes = [], []
    bar = None
    for name in models:
        spec = load_spec(name, data=data, limit=limit, train_data=train_data, train_limit=train_limit,
                         imagenet_dir=imagenet_dir, image_size=image_size, pretrained=pretrained, seed=seed,
                         progress=progress, log=log, workers=workers)
        notes.append(spec.note)
        spec.model.to(device)
        ref_logits, Y, x_bound = outputs(spec.model, spec.data, device)
        check = spec.data.head(check_limit)
        base_top1 = top1(ref_logits, Y)
        macs0, params0 = costs(spec.model, spec.input_shape, spec.frozen, device)
        line = (f"{name}: unpruned top-1 {base_top1:.2f}% on {len(Y)} images, {macs0 / 1e6:.2f} M MACs, "
                f"{params0 / 1e6:.3f} M parameters")
        notes.append(line)
        log(line)
        calib = calibration_batches(spec.train_data, calib_batches, calib_batch_size) if "taylor" in importances \
            else []
        jobs = [(imp, sc, r) for imp in importances for sc in scopes for r in ratios]
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(jobs, desc=f"{name} pruning", leave=False)
        for imp, sc, ratio in (bar if bar is not None else jobs):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            pruned, tracker = prune(spec, imp, sc, ratio, iterative_steps=iterative_steps, round_to=round_to,
                                    max_pruning_ratio=max_pruning_ratio, calib=calib, device=device)
            macs, params = costs(pruned, spec.input_shape, frozen_shortcut_convs(pruned), device)
            # the certificate: original vs the original with the pruned channels zeroed
            zeroed = tracker.zeroed(spec.model).eval()
            embedded = tracker.embedded(spec.model, pruned)
            for (k, a), b in zip(zeroed.state_dict().items(), embedded.state_dict().values()):
                if not torch.equal(a, b):
                    raise FunctionMismatch(f"{name} {imp}: the zeroed copy and the pruned weights disagree at {k}")
            z_logits = outputs(zeroed, check, device)[0]
            logits = outputs(pruned, spec.data, device)[0]
            zero_diff = _relative_difference(z_logits, logits[:len(z_logits)])
            if zero_diff > 1e-5:
                raise FunctionMismatch(f"{name} {imp} {sc} {ratio}: the zeroed copy and the pruned model differ "
                                       f"by {zero_diff:.3g} (relative)")
            d = ps.path_metric(spec.model, zeroed, spec.input_shape)
            if not d.exact:
                raise FunctionMismatch(f"{name} {imp}: the zeroed copy is not dominated by the original")
            bound = x_bound * d.value
            observed = deviation(ref_logits, logits)
            check_bound(observed, bound, f"{name} {imp} {sc} {ratio}")
            row = {"model": name, "importance": imp, "scope": sc, "ratio": ratio, "macs_before": macs0,
                   "macs_after": macs, "macs_removed": 1 - macs / macs0, "params_before": params0,
                   "params_after": params, "params_removed": 1 - params / params0, "top1_unpruned": base_top1,
                   "top1": top1(logits, Y), "top1_finetuned": "", "D_relative": d.relative, "log10_D": d.log10,
                   "certified_bound": float(bound.max()), "observed_max": float(observed.max()),
                   "zeroed_vs_pruned": zero_diff, "finetuned_certified_bound": "", "finetuned_observed_max": ""}
            if finetune_epochs > 0:
                if spec.train_data is None:
                    raise ValueError(f"{name}: fine-tuning needs training data")
                finetune(pruned, spec.train_data, finetune_epochs, lr=finetune_lr, batch_size=finetune_batch_size,
                         device=device, workers=workers, seed=seed, progress=progress)
                ft_logits = outputs(pruned, spec.data, device)[0]
                ft_embedded = tracker.embedded(spec.model, pruned).eval()
                e_logits = outputs(ft_embedded, check, device)[0]
                e_diff = _relative_difference(e_logits, ft_logits[:len(e_logits)])
                if e_diff > 1e-5:
                    raise FunctionMismatch(f"{name} {imp}: the fine-tuned model and its embedding differ by "
                                           f"{e_diff:.3g}")
                d_ft = ps.path_metric(spec.model, ft_embedded, spec.input_shape)
                ft_bound = x_bound * d_ft.value
                ft_observed = deviation(ref_logits, ft_logits)
                check_bound(ft_observed, ft_bound, f"{name} {imp} {sc} {ratio} fine-tuned")
                row.update(top1_finetuned=top1(ft_logits, Y), finetuned_certified_bound=float(ft_bound.max()),
                           finetuned_observed_max=float(ft_observed.max()))
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            ft = f", fine-tuned {row['top1_finetuned']:.2f}%" if finetune_epochs > 0 else ""
            msg = (f"  {imp:24s} {sc:6s} {ratio:.2f}: MACs -{row['macs_removed']:.1%}, top-1 {row['top1']:.2f}%{ft}, "
                   f"D/||Phi|| {d.relative:.3g}, observed {row['observed_max']:.3g} <= {row['certified_bound']:.3g} "
                   f"({row['seconds']:.1f} s)")
            if bar is not None:
                bar.write(msg)
            else:
                log(msg)
        if bar is not None:
            bar.close()
    if not is_main_process():
        return rows
    desc = data if all(m in CIFAR_MODELS for m in models) else "imagenet"
    title = (f"Structured pruning (torch-pruning MetaPruner), {desc}, {len(Y)} images, "
             f"{iterative_steps} step(s), fine-tune {finetune_epochs} epoch(s)")
    paths = write_table(rows, out, "structured", title, COLUMNS, FORMATS)
    md_columns = [c for c in MD_COLUMNS if finetune_epochs > 0 or c != "top1_finetuned"]
    md = markdown_table(rows, md_columns, FORMATS, title)
    md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n" + (
        "- macs/params: torch-pruning's count_ops_and_params without the frozen 0/1 shortcut convolutions; "
        "D_relative: path-metric lost / ||Phi(original)||_1; certified_bound: max over the data of "
        "max(1, ||x||_inf) * D; observed_max: max over the data of ||R_orig(x) - R_pruned(x)||_1. "
        "All columns in structured.csv.\n")
    paths["md"].write_text(md)
    plot(rows, out / "structured.png", title)
    log(f"wrote {', '.join(str(p) for p in paths.values())}, {out / 'structured.png'}")
    return rows


def plot(rows, path, subtitle=""):
    """Top-1 against the fraction of MACs removed: one line per importance, one panel per model and scope
    (dashed: after fine-tuning)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    scopes = list(dict.fromkeys(r["scope"] for r in rows))
    imps = list(dict.fromkeys(r["importance"] for r in rows))
    fig, axes = plt.subplots(len(models), len(scopes), figsize=(5.2 * len(scopes), 4.0 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, sc in enumerate(scopes):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == m and r["scope"] == sc]
            if sel:
                ax.axhline(sel[0]["top1_unpruned"], color="gray", lw=0.8, ls=":", label="unpruned")
            for k, imp in enumerate(imps):
                pts = sorted((100 * r["macs_removed"], r["top1"], r["top1_finetuned"]) for r in sel
                             if r["importance"] == imp)
                if not pts:
                    continue
                color = f"C{k}"
                style = dict(lw=2.2) if imp.startswith("path-metric") else dict(lw=1.2)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=imp, **style)
                ft = [(p[0], p[2]) for p in pts if p[2] != ""]
                if ft:
                    ax.plot(*zip(*ft), marker="x", ls="--", color=color, **style)
            ax.set_title(f"{m}, {sc} ranking", fontsize=10)
            ax.set_xlabel("MACs removed (%)")
            ax.set_ylabel("top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(subtitle + ("\n(dashed: after fine-tuning)" if any(r["top1_finetuned"] != "" for r in rows) else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m pathsaliency.recipes.structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20"], choices=list(CIFAR_MODELS + IMAGENET_MODELS),
                   metavar="MODEL", help="resnet20 resnet32 (resnet44 resnet56) imagenet:resnet18 imagenet:resnet50")
    p.add_argument("--importances", nargs="+", default=["path-metric", "l1", "taylor"], choices=list(IMPORTANCES),
                   metavar="IMP", help=" ".join(IMPORTANCES))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6], help="channel pruning ratios")
    p.add_argument("--scope", default="both", choices=["local", "global", "both"])
    p.add_argument("--iterative-steps", type=int, default=1)
    p.add_argument("--round-to", type=int, help="keep channel counts multiples of this")
    p.add_argument("--max-pruning-ratio", type=float, default=1.0, help="cap per layer (global ranking)")
    p.add_argument("--data", default="test", choices=["test", "sample", "torchvision"], help="CIFAR-10 evaluation data")
    p.add_argument("--limit", type=int, help="use only the first N evaluation images")
    p.add_argument("--check-limit", type=int, default=1000,
                   help="images on which the zeroed copy is compared with the pruned model (0: all)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune each pruned model")
    p.add_argument("--train-limit", type=int, help="use only N training images (fine-tuning, calibration)")
    p.add_argument("--train-data", default="train", choices=["train", "sample"],
                   help="CIFAR-10 training data; 'sample' = the packaged test sample as a stand-in (tests only)")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--finetune-batch-size", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=4, help="batches of training data for taylor gradients")
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--imagenet-dir", help="ImageFolder root (val/ and optionally train/) for imagenet:* models")
    p.add_argument("--image-size", type=int, default=224, help="imagenet crop size (resize to size*256/224 first)")
    p.add_argument("--pretrained", action="store_true", help="torchvision's ImageNet weights (downloads them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (fine-tuning, ImageFolder)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice; 1 is often faster "
                   "on a small shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/structured")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.models, a.data, a.importances, a.ratios, a.scope, a.iterative_steps, a.round_to, a.max_pruning_ratio,
        a.seed, a.out, a.limit, a.finetune_epochs, a.train_limit, a.train_data, a.finetune_lr,
        a.finetune_batch_size, a.calib_batches, a.calib_batch_size, a.check_limit, a.imagenet_dir, a.image_size,
        a.pretrained, a.device, a.workers, progress=not a.no_progress,
        log=(print if is_main_process() else (lambda *_: None)))


if __name__ == "__main__":
    main()
