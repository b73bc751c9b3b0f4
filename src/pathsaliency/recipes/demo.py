"""``pathsaliency demo``: the unstructured recipe on the packaged data, and one robustness report.

Runs with no network and no data beyond the package: the pretrained CIFAR-10 ResNet-20 and 1,000 real
CIFAR-10 test images ship inside it. It prunes the network at 10-80 % global sparsity by path-magnitude,
by the library's default invariant criterion ``norm-matched`` and by magnitude, before and after a function-preserving random
rescaling (the attack that breaks magnitude pruning), one-shot (no training images ship, so no
batch-norm re-estimation), prints accuracy, the certified bound and the observed deviation of every pruned
network, and writes the table (CSV, Markdown, JSON), a plot, and the full robustness report of the
path-magnitude network at 40 % sparsity.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import unstructured

CRITERIA = ("path-magnitude", "norm-matched", "magnitude", "magnitude (rescaled)", "path-magnitude (rescaled)",
            "norm-matched (rescaled)")


def run_demo(out="out/demo", limit=None, progress=True, log=print):
    """Run the demo (see the module docstring) into ``out``; returns the unstructured recipe's rows."""
    start = time.perf_counter()
    out = Path(out)
    config = unstructured.Config(models=("resnet20",), data="sample", limit=limit, criteria=CRITERIA,
                                 reestimate_bn=False, out=str(out), progress=progress)
    rows = unstructured.run(config, log=log)
    log("")
    log((out / "unstructured.md").read_text())
    by = {(r["criterion"], r["sparsity"]): r for r in rows}
    hi = max(r["sparsity"] for r in rows)
    mag, mag_r = by[("magnitude", hi)], by[("magnitude (rescaled)", hi)]
    log(f"The rescaling attack at {hi:.0%} sparsity: magnitude {mag['top1']:.1f}% -> {mag_r['top1']:.1f}% after a "
        f"function-preserving rescaling; " + "; ".join(
            f"{c} {by[(c, hi)]['top1']:.1f}% -> {by[(c + ' (rescaled)', hi)]['top1']:.1f}% (identical masks: "
            f"{by[(c + ' (rescaled)', hi)]['same_masks_as_unrescaled']})" for c in ("path-magnitude", "norm-matched")) + ".")
    log("Every observed deviation is below its certified bound max(1, ||x||_inf) * D (checked on each image).")
    _report(out, limit, log)
    log(f"demo finished in {time.perf_counter() - start:.0f} s; files in {out}/")
    return rows


def _report(out, limit, log):
    """The robustness report of the path-magnitude network at 40 % sparsity."""
    from pathsaliency import robustness_report
    from pathsaliency.models.cifar_resnet import load_cifar_resnet
    from pathsaliency.pruning import prune_unstructured

    X, Y = unstructured.load_data("sample", limit)
    ref = load_cifar_resnet("resnet20")
    pruned, _ = prune_unstructured(ref, 0.4, unstructured.INPUT_SHAPE, criterion="path-magnitude")
    report = robustness_report(ref, pruned, [(X[i:i + 500], Y[i:i + 500]) for i in range(0, len(X), 500)],
                               input_shape=unstructured.INPUT_SHAPE, name="resnet20, path-magnitude 40%")
    report.save(out)
    log(f"robustness report of resnet20 pruned to 40% by path-magnitude: {out / 'report.md'}, report.json, report.png")
