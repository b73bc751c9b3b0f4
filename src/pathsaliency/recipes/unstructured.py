"""Unstructured pruning of CIFAR-10 ResNets: rescaling-invariant criteria against magnitude, and the
rescaling attack.

For each model and each global sparsity, every criterion of :data:`pathsaliency.pruning.CRITERIA`
(``path-magnitude``, ``magnitude``, and the invariant ``norm-matched``, ``norm-balanced-lamp``, ``wanda-lamp`` (data-aware), ``balanced-fan``,
``balanced``, ``balanced-lamp``, ``path-lamp`` of :mod:`pathsaliency.criteria`), each on the pretrained network and, as ``<criterion> (rescaled)``, on a
function-preserving random rescaling of it (``random_rescale``, factors 1, 128, 4096): the network
computes the same function, but plain weight magnitudes no longer say which weights matter; the
path-lifting criteria are invariant by construction (their masks are compared with the unrescaled ones).

Protocol: after pruning, the batch-norm statistics of every pruned network are re-estimated on the same
1,024 training images (``--no-reestimate-bn`` to skip; ``top1_one_shot`` is the accuracy before), and
optionally fine-tuned with its masks kept. Each row reports top-1, the certified path-metric ``D``
between the network and the evaluated copy (exact for pruning alone, MATH.md section 4 case 1; an upper
bound, case 2, once batch-norm statistics change; ``D_relative_masks`` is the exact ``D / ||Phi||`` of
the masks alone), the certified bound ``max(1, ||x||_inf) * D`` on ``||R_theta(x) - R_theta'(x)||_1`` and
the largest and mean deviation actually observed. An observed deviation above its certified bound is a
bug and stops the run. The Markdown table ends with the Spearman correlation, within each sparsity,
between ``D / ||Phi||`` and the accuracy drop.

    python -m pathsaliency.recipes.unstructured --models resnet20 resnet32 --data test --out out/unstructured
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch

import pathsaliency as ps
from pathsaliency import evaluate
from pathsaliency.bound import CertificateViolation, check_bound, rounding_allowance  # noqa: F401 (raised)
from pathsaliency.models.cifar_resnet import load_cifar_resnet
from pathsaliency.criteria import DATA_CRITERIA
from pathsaliency.pruning import CRITERIA as KINDS
from pathsaliency.pruning import apply_masks, masks_from_scores, unstructured_scores

from .cifar10 import cifar10
from .common import as_tensors, reestimate_batchnorm, seed_everything, top1, write_table
from . import harness
from .harness import spearman
from .training import finetune

CRITERIA = {name: (kind, rescaled) for kind in KINDS for rescaled in (False, True)  # name -> (criterion, rescaled)
            for name in [kind + (" (rescaled)" if rescaled else "")]}
DEFAULT_CRITERIA = ("path-magnitude", "magnitude", "norm-matched", "norm-balanced-lamp", "wanda-lamp", "balanced-fan",
                    "magnitude (rescaled)", "norm-matched (rescaled)", "norm-balanced-lamp (rescaled)",
                    "wanda-lamp (rescaled)")
INPUT_SHAPE = (3, 32, 32)
COLUMNS = ["model", "criterion", "sparsity", "top1_one_shot", "top1", "log10_D", "D_relative", "D_relative_masks",
           "certified_bound", "observed_max", "observed_mean", "exact", "same_masks_as_unrescaled", "bn_reestimated",
           "finetuned"]
FORMATS = {"top1": ".2f", "top1_one_shot": ".2f", "log10_D": ".3f", "D_relative": ".3g", "D_relative_masks": ".3g",
           "certified_bound": ".3g", "observed_max": ".3g", "observed_mean": ".3g"}


@dataclass
class Config:
    """One run of the unstructured comparison (every field is a command-line option)."""

    models: Tuple[str, ...] = field(default=("resnet20",), metadata={"help": "cifar ResNets: resnet20 resnet32"})
    data: str = field(default="test", metadata={"help": "test (10,000 JPEGs), sample (1,000 packaged) or torchvision"})
    limit: Optional[int] = field(default=None, metadata={"help": "use only the first N test images"})
    sparsities: Tuple[float, ...] = (0.1, 0.2, 0.4, 0.6, 0.8)
    criteria: Tuple[str, ...] = DEFAULT_CRITERIA
    factors: Tuple[float, ...] = field(default=(1, 128, 4096), metadata={"help": "random rescaling factors"})
    reestimate_bn: bool = field(default=True, metadata={"help": "re-estimate batch-norm statistics after pruning"})
    bn_images: int = field(default=1024, metadata={"help": "training images for the batch-norm re-estimation and the "
                                                              "data-aware criteria's calibration"})
    one_shot_accuracy: bool = field(default=True, metadata={"help": "also evaluate before the re-estimation"})
    finetune_epochs: int = field(default=0, metadata={"help": "fine-tune on the JPEG train set before pruning"})
    finetune_after_epochs: int = field(default=0, metadata={"help": "fine-tune each pruned model (masks kept)"})
    train_limit: Optional[int] = field(default=None, metadata={"help": "use only N training images for fine-tuning"})
    seed: int = 0
    out: str = "out/unstructured"
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def load_data(data: str, limit=None, progress=False):
    """``(X, Y)`` for ``data`` = ``test`` (the 10,000-image JPEG test set), ``sample`` (the 1,000 packaged
    images) or ``torchvision`` (CIFAR-10 test through torchvision, downloaded)."""
    source = {"test": "auto", "sample": "sample", "torchvision": "torchvision"}[data]
    return as_tensors(cifar10("test", source=source, limit=limit), progress=progress)


def bn_images(n: int):
    """The first ``n`` CIFAR-10 training images (class-balanced, not augmented): the same for every
    criterion, never test images."""
    return as_tensors(cifar10("train", limit=n))[0]


def run(config: Config = Config(), log=print):
    """Run the comparison; returns the rows (also written to ``config.out`` as CSV, Markdown, JSON, PNG)."""
    c = config
    seed_everything(c.seed)
    out = Path(c.out)
    X, Y = load_data(c.data, c.limit, c.progress)
    needs_images = c.reestimate_bn or any(CRITERIA[name][0] in DATA_CRITERIA for name in c.criteria)
    calib = bn_images(c.bn_images) if needs_images else None  # training images: none ship with the package
    rows = []
    for name in c.models:
        ref = load_cifar_resnet(name)
        if c.finetune_epochs:
            ref = finetune(ref, cifar10("train", augment=True, limit=c.train_limit), c.finetune_epochs, seed=c.seed,
                           progress=c.progress)
        after = None
        if c.finetune_after_epochs:
            def after(pruned, masks):
                return finetune(pruned, cifar10("train", augment=True, limit=c.train_limit), c.finetune_after_epochs,
                                masks=masks, seed=c.seed, progress=c.progress)
        rows += compare(name, ref, (X, Y), INPUT_SHAPE, c.sparsities, c.criteria, c.factors, seed=c.seed,
                        finetune_after=after, bn_data=calib if c.reestimate_bn else None, calibration=calib,
                        one_shot_accuracy=c.one_shot_accuracy, log=log)
    title = f"Unstructured pruning on CIFAR-10 ({c.data}, {len(X)} images)"
    paths = write_table(rows, out, "unstructured", title, COLUMNS, FORMATS)
    with open(paths["md"], "a") as f:
        f.write("\n" + rank_agreement(rows))
    plot(rows, out / "unstructured.png", f"CIFAR-10 {c.data} ({len(X)} images)")
    log(f"wrote {', '.join(str(p) for p in paths.values())}, {out / 'unstructured.png'}")
    return rows


def rank_agreement(rows) -> str:
    """Markdown: per model and sparsity, Spearman's correlation between ``D / ||Phi||`` (of the evaluated
    network, and of the masks alone) and the accuracy drop, over the criteria of that sparsity."""
    lines = ["Spearman rank correlation within one sparsity between D / ||Phi|| and the top-1 drop "
             "(1 = the certificate orders the criteria exactly as accuracy does):", "",
             "| model | sparsity | criteria | rho (D of the evaluated network) | rho (D of the masks alone) |",
             "|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for sp in dict.fromkeys(r["sparsity"] for r in rows if r["model"] == model):
            group = [r for r in rows if r["model"] == model and r["sparsity"] == sp]
            drop = [-r["top1"] for r in group]
            lines.append(f"| {model} | {sp:.0%} | {len(group)} | {spearman([r['D_relative'] for r in group], drop):.2f} "
                         f"| {spearman([r['D_relative_masks'] for r in group], drop):.2f} |")
    return "\n".join(lines) + "\n"


def outputs(model, data, device="cpu", progress=False):
    """``(logits, labels, input bounds)`` of ``model`` on ``data``: an ``(X, Y)`` pair of tensors (batches of
    500) or an iterable of ``(x, y)`` batches (a DataLoader, for data too large to hold in memory), through
    :func:`pathsaliency.evaluate.outputs` (the input bound of a sample is ``max(1, ||x||_inf)``; on another
    ``device`` the model itself never moves)."""
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        X, Y = data
        data = [(X[i:i + 500], Y[i:i + 500]) for i in range(0, len(X), 500)]
    out = evaluate.outputs(model, data, device=device, progress=progress)
    return out.outputs.float(), out.labels, out.input_bounds


def compare(name, ref, data, input_shape=INPUT_SHAPE, sparsities=(0.1, 0.2, 0.4, 0.6, 0.8), criteria=DEFAULT_CRITERIA,
            factors=(1, 128, 4096), seed=0, finetune_after=None, bn_data=None, calibration=None, one_shot_accuracy=True,
            device="cpu", progress=False, log=print):
    """The rows of one reference network ``ref`` (called ``name``, in eval mode, on the CPU) on ``data`` (see
    :func:`outputs`), whose samples have shape ``input_shape``: every criterion at every sparsity, each pruned
    network's certified distance and bound checked against its observed deviation on every sample.
    ``calibration`` (images) feeds the data-aware criteria (``wanda-lamp``: the same images for the
    network and its rescaled copy); ``bn_data`` (images), if given, re-estimates every pruned network's batch-norm statistics on them;
    ``finetune_after(pruned, masks)``, if given, then returns it fine-tuned with its masks kept (on the
    CPU); ``one_shot_accuracy`` also evaluates it before those (``top1_one_shot``, None when skipped);
    ``device`` is where the networks are evaluated."""
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
        scores = unstructured_scores(base, input_shape, kind, calibration=calibration)
        for sp in sparsities:
            masks = masks_from_scores(scores, sp)
            pruned = apply_masks(base, masks)
            changed = bn_data is not None or finetune_after is not None
            one_shot = top1(outputs(pruned, data, device, progress)[0], Y) if changed and one_shot_accuracy else None
            d_masks = ps.path_metric(base, pruned, input_shape)
            if bn_data is not None:
                pruned = reestimate_batchnorm(pruned, bn_data)
            if finetune_after is not None:
                pruned = finetune_after(pruned, masks)
            logits = outputs(pruned, data, device, progress)[0]
            d = ps.path_metric(base, pruned, input_shape) if changed else d_masks
            bound = x_bound * d.value
            observed = evaluate.deviation(base_logits[on_rescaled], logits)
            check_bound(observed, bound, rounding_allowance(base_logits[on_rescaled], logits),
                        what=f"{name} {crit} {sp:.0%}")
            same = ""
            if on_rescaled and (kind, sp) in plain_masks:
                same = all(torch.equal(masks[k], plain_masks[(kind, sp)][k]) for k in masks)
            elif not on_rescaled:
                plain_masks[(kind, sp)] = masks
            acc = top1(logits, Y)
            rows.append({"model": name, "criterion": crit, "sparsity": sp,
                         "top1_one_shot": one_shot if changed else acc, "top1": acc,
                         "log10_D": d.log10, "D_relative": d.relative, "D_relative_masks": d_masks.relative,
                         "certified_bound": float(bound.max()), "observed_max": float(observed.max()),
                         "observed_mean": float(observed.mean()), "exact": d.exact, "same_masks_as_unrescaled": same,
                         "bn_reestimated": bn_data is not None, "finetuned": finetune_after is not None})
        log(f"  {crit:26s} " + "  ".join(f"{r['sparsity']:.0%}: {r['top1']:5.2f}%" for r in rows
                                            if r["criterion"] == crit)
            + f"  ({time.perf_counter() - t0:.1f} s)")
    return rows


def random_rescale_seeded(model, factors, seed):
    return ps.random_rescale(model, factors, generator=torch.Generator().manual_seed(seed))


def plot(rows, path, subtitle=""):
    """Top-1 against sparsity, one line per criterion and model (dotted: on the rescaled network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    kinds = list(dict.fromkeys(CRITERIA[r["criterion"]][0] for r in rows))
    colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for crit in dict.fromkeys(r["criterion"] for r in rows):
            kind, rescaled = CRITERIA[crit]
            pts = [(r["sparsity"] * 100, r["top1"]) for r in rows if r["model"] == m and r["criterion"] == crit]
            if pts:
                ax.plot(*zip(*pts), color=colors[kind], linestyle=":" if rescaled else "-",
                        marker="x" if rescaled else "o", label=crit)
        ax.set_title(f"{m}: one-shot global pruning", fontsize=10)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    bn = " BN re-estimated." if rows and rows[0].get("bn_reestimated") else ""
    fig.suptitle(f"Pruning criteria before and after a function-preserving rescaling.{bn}\n{subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    return harness.main(Config, run, argv, prog="python -m pathsaliency.recipes.unstructured", description=__doc__,
                        choices={"criteria": list(CRITERIA), "data": ["test", "sample", "torchvision"],
                                 "models": ["resnet20", "resnet32"]})


if __name__ == "__main__":
    main()
