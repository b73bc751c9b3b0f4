"""Unstructured pruning of CIFAR-10 ResNets: path-magnitude against magnitude, and the rescaling attack.

For each model and each global sparsity, four criteria:

* ``path-magnitude`` and ``magnitude`` on the pretrained network;
* ``magnitude (rescaled)`` and ``path-magnitude (rescaled)`` on a function-preserving random rescaling
  of it (``random_rescale``, factors 1, 128, 4096): the network computes the same function, but plain
  weight magnitudes no longer say which weights matter; path-magnitude is invariant by construction
  (its masks are compared with the unrescaled ones).

Each row reports top-1 on the data, the certified path-metric ``D`` between the network and its pruned
copy (exact: pruning is case 1 of MATH.md section 4), the certified bound ``max(1, ||x||_inf) * D`` on
``||R_theta(x) - R_theta'(x)||_1`` and the largest and mean deviation actually observed. An observed
deviation above its certified bound is a bug and stops the run.

    python -m pathsaliency.recipes.unstructured --models resnet20 resnet32 --data test --out out/unstructured
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import pathsaliency as ps
from pathsaliency.bound import CertificateViolation
from pathsaliency.models.cifar_resnet import load_cifar_resnet
from pathsaliency.pruning import apply_masks, masks_from_scores, unstructured_scores

from .cifar10 import cifar10
from .common import as_tensors, deviation, predict, seed_everything, top1, write_table
from .training import finetune

CRITERIA = {  # name -> (criterion, on the rescaled network)
    "path-magnitude": ("path-magnitude", False),
    "magnitude": ("magnitude", False),
    "magnitude (rescaled)": ("magnitude", True),
    "path-magnitude (rescaled)": ("path-magnitude", True),
}
INPUT_SHAPE = (3, 32, 32)
COLUMNS = ["model", "criterion", "sparsity", "top1", "log10_D", "D_relative", "certified_bound", "observed_max",
           "observed_mean", "exact", "same_masks_as_unrescaled", "finetuned"]
FORMATS = {"top1": ".2f", "log10_D": ".3f", "D_relative": ".3g", "certified_bound": ".3g", "observed_max": ".3g",
           "observed_mean": ".3g"}


def load_data(data: str, limit=None, progress=False):
    """``(X, Y)`` for ``data`` = ``test`` (the 10,000-image JPEG test set), ``sample`` (the 1,000 packaged
    images) or ``torchvision`` (CIFAR-10 test through torchvision, downloaded)."""
    source = {"test": "auto", "sample": "sample", "torchvision": "torchvision"}[data]
    return as_tensors(cifar10("test", source=source, limit=limit), progress=progress)


def check_bound(observed, bound, what):
    tol = 1e-6 * bound + 1e-9
    bad = observed > bound + tol
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise CertificateViolation(f"{what}: sample {i} deviates by {float(observed[i]):.6g}, above its certified "
                                   f"bound {float(bound[i]):.6g}; this is a bug")


def run(models=("resnet20",), data="sample", sparsities=(0.1, 0.2, 0.4, 0.6, 0.8), criteria=tuple(CRITERIA),
        factors=(1, 128, 4096), seed=0, out="out/unstructured", limit=None, finetune_epochs=0,
        finetune_after_epochs=0, train_limit=None, progress=True, log=print):
    """Run the comparison; returns the rows (also written to ``out`` as CSV, Markdown, JSON and PNG)."""
    seed_everything(seed)
    out = Path(out)
    X, Y = load_data(data, limit, progress)
    rows = []
    for name in models:
        ref = load_cifar_resnet(name)
        if finetune_epochs:
            ref = finetune(ref, cifar10("train", augment=True, limit=train_limit), finetune_epochs, seed=seed,
                           progress=progress)
        after = None
        if finetune_after_epochs:
            def after(pruned, masks):
                return finetune(pruned, cifar10("train", augment=True, limit=train_limit), finetune_after_epochs,
                                masks=masks, seed=seed, progress=progress)
        rows += compare(name, ref, (X, Y), INPUT_SHAPE, sparsities, criteria, factors, seed=seed,
                        finetune_after=after, log=log)
    paths = write_table(rows, out, "unstructured", f"Unstructured pruning on CIFAR-10 ({data}, {len(X)} images)",
                        COLUMNS, FORMATS)
    plot(rows, out / "unstructured.png", f"CIFAR-10 {data} ({len(X)} images)")
    log(f"wrote {', '.join(str(p) for p in paths.values())}, {out / 'unstructured.png'}")
    return rows


def outputs(model, data, device="cpu", progress=False):
    """``(logits, labels, input bounds)`` of ``model`` (evaluated as is: call ``.eval()`` first) on ``data``:
    an ``(X, Y)`` pair of tensors (batches of 500) or an iterable of ``(x, y)`` batches (a DataLoader, for
    data too large to hold in memory). The input bound of a sample is ``max(1, ||x||_inf)``. On another
    ``device`` a copy of the model is evaluated (the certificates are computed on the CPU copy)."""
    if torch.device(device) != torch.device("cpu"):
        model = copy.deepcopy(model).to(device)
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        X, Y = data
        return predict(model, X, device=device), Y, X.reshape(len(X), -1).abs().amax(1).double().clamp_min(1.0)
    if progress:
        from tqdm.auto import tqdm

        data = tqdm(data, desc="evaluate", leave=False)
    logits, labels, bounds = [], [], []
    with torch.no_grad():
        for x, y in data:
            logits.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
            bounds.append(x.reshape(len(x), -1).abs().amax(1).double().clamp_min(1.0))
    return torch.cat(logits), torch.cat(labels), torch.cat(bounds)


def compare(name, ref, data, input_shape=INPUT_SHAPE, sparsities=(0.1, 0.2, 0.4, 0.6, 0.8), criteria=tuple(CRITERIA),
            factors=(1, 128, 4096), seed=0, finetune_after=None, device="cpu", progress=False, log=print):
    """The rows of one reference network ``ref`` (called ``name``, in eval mode, on the CPU) on ``data`` (see
    :func:`outputs`), whose samples have shape ``input_shape``: every criterion at every sparsity, each pruned
    network's certified distance and bound checked against its observed deviation on every sample.
    ``finetune_after(pruned, masks)``, if given, returns the pruned network fine-tuned with its masks kept
    (on the CPU); ``device`` is where the networks are evaluated."""
    ref_logits, Y, x_bound = outputs(ref, data, device, progress)
    rescaled = random_rescale_seeded(ref, factors, seed)
    bases = {False: ref, True: rescaled}
    base_logits = {False: ref_logits, True: outputs(rescaled, data, device, progress)[0]}
    log(f"{name}: top-1 {top1(base_logits[False], Y):.2f}% on {len(Y)} images; rescaled copy differs by at most "
        f"{float((base_logits[True] - base_logits[False]).abs().max()):.2e}")
    rows, plain_masks = [], {}
    for crit in criteria:
        kind, on_rescaled = CRITERIA[crit]
        base = bases[on_rescaled]
        t0 = time.perf_counter()
        scores = unstructured_scores(base, input_shape, kind)
        for sp in sparsities:
            masks = masks_from_scores(scores, sp)
            pruned = apply_masks(base, masks)
            if finetune_after is not None:
                pruned = finetune_after(pruned, masks)
            logits = outputs(pruned, data, device, progress)[0]
            d = ps.path_metric(base, pruned, input_shape)
            bound = x_bound * d.value
            observed = deviation(base_logits[on_rescaled], logits)
            check_bound(observed, bound, f"{name} {crit} {sp:.0%}")
            same = ""
            if on_rescaled and (crit.split(" ")[0], sp) in plain_masks:
                ref_masks = plain_masks[(crit.split(" ")[0], sp)]
                same = all(torch.equal(masks[k], ref_masks[k]) for k in masks)
            elif not on_rescaled:
                plain_masks[(crit, sp)] = masks
            rows.append({"model": name, "criterion": crit, "sparsity": sp, "top1": top1(logits, Y),
                         "log10_D": d.log10, "D_relative": d.relative, "certified_bound": float(bound.max()),
                         "observed_max": float(observed.max()), "observed_mean": float(observed.mean()),
                         "exact": d.exact, "same_masks_as_unrescaled": same,
                         "finetuned": finetune_after is not None})
        log(f"  {crit:26s} " + "  ".join(f"{r['sparsity']:.0%}: {r['top1']:5.2f}%" for r in rows
                                            if r["criterion"] == crit)
            + f"  ({time.perf_counter() - t0:.1f} s)")
    return rows


def random_rescale_seeded(model, factors, seed):
    return ps.random_rescale(model, factors, generator=torch.Generator().manual_seed(seed))


def plot(rows, path, subtitle=""):
    """Top-1 against sparsity, one line per criterion and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    styles = {"path-magnitude": ("C0", "-", "o"), "path-magnitude (rescaled)": ("C0", ":", "x"),
              "magnitude": ("C3", "-", "o"), "magnitude (rescaled)": ("C3", ":", "x")}
    for ax, m in zip(axes[0], models):
        for crit, (color, ls, marker) in styles.items():
            pts = [(r["sparsity"] * 100, r["top1"]) for r in rows if r["model"] == m and r["criterion"] == crit]
            if pts:
                ax.plot(*zip(*pts), color=color, linestyle=ls, marker=marker, label=crit)
        ax.set_title(f"{m}: one-shot global pruning")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Path-magnitude vs magnitude, before and after a function-preserving rescaling. {subtitle}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m pathsaliency.recipes.unstructured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20"], help="cifar ResNets: resnet20 resnet32")
    p.add_argument("--data", default="test", choices=["test", "sample", "torchvision"])
    p.add_argument("--limit", type=int, help="use only the first N test images")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.6, 0.8])
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    p.add_argument("--factors", type=float, nargs="+", default=[1, 128, 4096])
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune on the JPEG train set before pruning")
    p.add_argument("--finetune-after-epochs", type=int, default=0, help="fine-tune each pruned model (masks kept)")
    p.add_argument("--train-limit", type=int, help="use only N training images for fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/unstructured")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    run(a.models, a.data, a.sparsities, a.criteria, a.factors, a.seed, a.out, a.limit, a.finetune_epochs,
        a.finetune_after_epochs, a.train_limit, progress=not a.no_progress)


if __name__ == "__main__":
    main()
