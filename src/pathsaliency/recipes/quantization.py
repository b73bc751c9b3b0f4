"""Quantization of CIFAR-10 ResNets (optionally pruned first) with NNCF and Intel Neural Compressor,
and the robustness report of each quantized network.

For each model, each pruning sparsity (0 = dense; otherwise one-shot global path-magnitude pruning with
``prune_unstructured``) and each method:

* ``nncf-int8``       NNCF post-training INT8 (``nncf.quantize``): conv + linear weights (per channel)
                      and activations;
* ``inc-static-int8`` INC static W8A8 (PT2E flow, X86 quantizer): conv + linear weights (per channel)
                      and activations (per tensor);
* ``inc-static-int8-mixed`` the same with the certificate's float layers (``set_local`` fp32);
* ``nncf-int8-mixed`` NNCF INT8 with the layers chosen by the certificate kept float (``--mixed-size``: the
                      weights take at most that fraction of their float size; see
                      ``integrations.nncf.quantize_mixed_int8``);
* ``nncf-w8``         NNCF ``compress_weights`` INT8_ASYM: conv + linear weights (per channel), weights only;
* ``nncf-w4``         NNCF ``compress_weights`` INT4_SYM (groups of 16) on the linear layer, the convolutions
                      on the INT8_ASYM backup, weights only;
* ``inc-rtn-w8``      INC weight-only round-to-nearest, 8 bits: **nn.Linear layers only** (INC 3.10's RTN
                      leaves every convolution float: on ResNet-20 it quantizes 640 of 268,336 weights),
                      no activation quantization;
* ``inc-rtn-w4``      the same with 4 bits.

The float network that is quantized (the pruned one, for a pruned row) is the reference ``theta``. The
certificate is about the *weights-only model*: the reference architecture holding the weights the
quantized model really computes with (``effective_theta`` of the integration). Each row gives top-1 of
the reference, of the quantized model as produced (the *full* model, activations quantized where the
method does), and of the weights-only model; the certified distance ``D`` (log10, exact flag,
``D / ||Phi(theta)||_1``), the certified bound ``max(1, ||x||_inf) * D`` on ``||R_theta(x) - R_theta'(x)||_1``
and the observed deviation of the weights-only model (checked against its bound on every image: a
violation is a bug and stops the run), and, apart and NOT certified, the observed deviation of the full
model. The certificate says nothing about activation quantization.

Calibration (NNCF and INC static) uses ``--calibration-size`` images of the CIFAR-10 *train* split
(``../shared/data/cifar10/train.zip``; outside CI, torchvision's download if the zip is missing). With
``--calibration-data sample``, or when the train split cannot be had outside CI, the packaged 1,000-image
sample stands in (test images, taken from the end of the sample; the table says so).

Writes ``<out>/<model>[-pruned<NN>]-<method>/report.{json,md,png}`` (the robustness report of that row) and
``<out>/quantization.{csv,md,json,png}``.

    python -m pathsaliency.recipes.quantization --models resnet20 resnet32 --prune-sparsity 0 0.4 \\
        --data test --calibration-size 300 --out out/quantization
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch

from pathsaliency.models.cifar_resnet import load_cifar_resnet

from .cifar10 import cifar10, in_ci
from .common import as_tensors, seed_everything, write_table
from . import harness
from .harness import figure, label, save
from .unstructured import INPUT_SHAPE, load_data

METHODS = {  # name -> what is quantized (the table's "quantized" column)
    "nncf-int8": "conv+linear weights INT8 (per channel) and activations INT8",
    "nncf-int8-mixed": "as nncf-int8, the layers chosen by the certificate kept float",
    "nncf-w8": "conv+linear weights INT8 (per channel, compress_weights); activations float",
    "nncf-w4": "linear weights INT4 (groups of 16), convs INT8 backup (compress_weights); activations float",
    "inc-static-int8": "conv+linear weights INT8 (per channel) and activations INT8 (per tensor)",
    "inc-static-int8-mixed": "as inc-static-int8, the layers chosen by the certificate kept float",
    "inc-rtn-w8": "Linear layers only (INC 3.10 RTN leaves every conv float), weights 8 bit; activations float",
    "inc-rtn-w4": "Linear layers only (INC 3.10 RTN leaves every conv float), weights 4 bit; activations float",
}
CALIBRATED = ("nncf-int8", "nncf-int8-mixed", "inc-static-int8", "inc-static-int8-mixed")
ACTIVATIONS_QUANTIZED = CALIBRATED
COLUMNS = ["model", "sparsity", "method", "quantized", "quantized_weights", "float_layers", "activations_quantized",
           "top1_reference", "top1_full",
           "top1_weights_only", "log10_path_norm", "log10_D", "exact", "D_relative", "log10_certified_bound",
           "observed_max", "observed_mean", "observed_to_certified", "full_observed_max", "full_observed_mean",
           "calibration"]
FORMATS = {"sparsity": ".2f", "quantized_weights": ".3g", "top1_reference": ".2f", "top1_full": ".2f", "top1_weights_only": ".2f",
           "log10_path_norm": ".3f", "log10_D": ".3f", "D_relative": ".3g", "log10_certified_bound": ".3f",
           "observed_max": ".3g", "observed_mean": ".3g", "observed_to_certified": ".3g",
           "full_observed_max": ".3g", "full_observed_mean": ".3g"}
CALIBRATION_BATCH = 32  # INC static: images per calibration forward pass


@dataclass
class Config:
    """One quantization run (every field is a command-line option)."""

    models: Tuple[str, ...] = field(default=("resnet20",), metadata={"help": "cifar ResNets: resnet20 resnet32"})
    methods: Tuple[str, ...] = tuple(METHODS)
    prune_sparsity: Tuple[float, ...] = field(default=(0.0,), metadata={
        "help": "global path-magnitude sparsities to prune to before quantizing; 0 = dense"})
    data: str = field(default="test", metadata={"help": "evaluation images"})
    limit: Optional[int] = field(default=None, metadata={"help": "use only the first N evaluation images"})
    calibration_size: int = field(default=300, metadata={"help": "calibration images (NNCF, INC static)"})
    calibration_data: str = field(default="train", metadata={
        "help": "train: CIFAR-10 train split; sample: the packaged test sample as a stand-in"})
    rtn_group_size: int = field(default=32, metadata={"help": "RTN group size (-1: one group per channel)"})
    mixed_size: float = field(default=0.4, metadata={
        "help": "mixed methods: the weights' size as a fraction of float, in [0.25, 1]"})
    per_layer: bool = field(default=True, metadata={"help": "the per-layer breakdown of the reports"})
    seed: int = 0
    out: str = "out/quantization"
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def calibration_images(size: int, data: str = "train", *, avoid: int = 0, progress=False, log=print):
    """``(X, description)``: ``size`` calibration images (normalised, no augmentation).

    ``data="train"``: the first ``size`` images (class-balanced order) of the CIFAR-10 train split, from the
    shared zip or, outside CI, torchvision; if neither can be had outside CI, the packaged sample stands in
    (with a note). ``data="sample"``: the last ``size`` images of the packaged sample (test images), disjoint
    from its first ``avoid`` images (those evaluated when ``--data sample --limit avoid``) if
    ``size + avoid <= 1000``.
    """
    if size < 1:
        raise ValueError(f"the calibration set needs at least one image, got {size}")
    if data == "train":
        try:
            X, _ = as_tensors(cifar10("train", limit=size), progress=progress, desc="calibration")
            return X, f"train ({len(X)} images)"
        except Exception as exc:  # noqa: BLE001 - missing zip, failed download, ...
            if in_ci():
                raise
            log(f"pathsaliency: the CIFAR-10 train split is not available ({exc}); calibrating on the packaged "
                "sample instead (test images: a stand-in only)")
    elif data != "sample":
        raise ValueError(f"calibration data must be 'train' or 'sample', got {data!r}")
    ds = cifar10("test", source="sample")
    n = len(ds)
    if size > n:
        raise ValueError(f"the packaged sample holds {n} images, {size} calibration images asked")
    X, _ = as_tensors(torch.utils.data.Subset(ds, range(n - size, n)))
    overlap = "" if size + avoid <= n or avoid == 0 else ", overlapping the evaluated ones"
    return X, f"STAND-IN: packaged sample, {size} test images{overlap}"


def quantize(method: str, model, X_cal, *, rtn_group_size: int = 32, mixed_size: float = 0.4):
    """``(quantized model, its effective theta, float layers)`` for ``method`` on a copy of ``model``.

    The theta is the integration's ``effective_theta``; ``float layers`` are the layers a mixed method kept
    float (``[]`` otherwise)."""
    if method.startswith("nncf-"):
        import nncf

        from pathsaliency.integrations import nncf as pnncf

        batches = [X_cal[i:i + 1] for i in range(len(X_cal))] if X_cal is not None else None
        kept = []
        if method == "nncf-int8":  # NNCF's advice: calibration batches of one
            q = pnncf.quantize_int8(model, batches, subset_size=len(batches))
        elif method == "nncf-int8-mixed":
            q, kept = pnncf.quantize_mixed_int8(model, batches, INPUT_SHAPE, mixed_size)
        elif method == "nncf-w8":
            q = pnncf.compress_weights(model, [torch.zeros(1, *INPUT_SHAPE)], nncf.CompressWeightsMode.INT8_ASYM)
        elif method == "nncf-w4":
            q = pnncf.compress_weights(model, [torch.zeros(1, *INPUT_SHAPE)], nncf.CompressWeightsMode.INT4_SYM,
                                       group_size=16, all_layers=True, backup_mode=nncf.BackupMode.INT8_ASYM)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
        return q, pnncf.effective_theta(q, model), kept
    from pathsaliency.integrations import neural_compressor as pinc

    if method in ("inc-static-int8", "inc-static-int8-mixed"):
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        example = X_cal[:max(2, min(CALIBRATION_BATCH, len(X_cal)))]
        if len(example) < 2:
            example = example.expand(2, *example.shape[1:]).clone()
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        calibration = [X_cal[i:i + CALIBRATION_BATCH] for i in range(0, len(X_cal), CALIBRATION_BATCH)]
        q = pinc.quantize_static_int8(model, example, calibration, dynamic_shapes=({0: batch},))
        kept = []
        if method == "inc-static-int8-mixed":
            kept = pinc.keep_float_by_certificate(model, q, INPUT_SHAPE, mixed_size)
            q = pinc.quantize_static_int8(model, example, calibration, dynamic_shapes=({0: batch},),
                                          config=pinc.float_layers_config(kept))
        theta = pinc.effective_theta(q, model)
        # robustness_report (like any evaluation loop) calls .eval(), which a PT2E graph refuses otherwise
        allow_exported_model_train_eval(q)
        return q, theta, kept
    if method in ("inc-rtn-w8", "inc-rtn-w4"):
        q = pinc.quantize_weight_only(model, bits=int(method[-1]), group_size=rtn_group_size)
        return q, pinc.effective_theta(q, model), []
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def quantized_weight_fraction(reference, theta) -> float:
    """Fraction of the conv/linear weights of ``reference`` in the layers whose ``theta`` values changed by
    more than float32 rounding (a float layer PT2E folded its batch norm into differs by that much)."""
    from pathsaliency import Theta

    mine, theirs = Theta.from_module(reference).layers, theta.layers
    changed = total = 0
    for name, module in reference.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            total += module.weight.numel()
            moved = not torch.allclose(mine[name][0], theirs[name][0], rtol=1e-5, atol=0)
            changed += module.weight.numel() if moved else 0
    return changed / total


def _tag(name: str, sparsity: float) -> str:
    return name if sparsity == 0 else f"{name}-pruned{round(100 * sparsity):02d}"


def run(config: Config = Config(), log=print):
    """Run every (model, sparsity, method) of ``config``; returns the rows (also written to ``config.out``,
    see the module doc)."""
    from pathsaliency import prune_unstructured, robustness_report

    c = config
    for m in c.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    for sp in c.prune_sparsity:
        if not 0 <= sp < 1:
            raise ValueError(f"a pruning sparsity is in [0, 1), got {sp}")
    _quiet_frameworks(c.methods)
    seed_everything(c.seed)
    out = Path(c.out)
    X, Y = load_data(c.data, c.limit, c.progress)
    X_cal, cal_note = (calibration_images(c.calibration_size, c.calibration_data, avoid=len(X), progress=c.progress,
                                          log=log)
                       if any(m in CALIBRATED for m in c.methods) else (None, ""))
    log(f"evaluating on {len(X)} CIFAR-10 {c.data} images; calibration: {cal_note or 'none (weight-only methods)'}")
    jobs = [(name, sp, m) for name in c.models for sp in c.prune_sparsity for m in c.methods]
    bar = None
    if c.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="quantization")
    rows = []
    try:
        for name in c.models:
            dense = load_cifar_resnet(name)
            for sp in c.prune_sparsity:
                seed_everything(c.seed)
                ref = (dense if sp == 0
                       else prune_unstructured(dense, sp, INPUT_SHAPE, criterion="path-magnitude")[0].eval())
                for method in c.methods:
                    t0 = time.perf_counter()
                    tag = _tag(name, sp)
                    if bar is not None:
                        bar.set_postfix_str(f"{tag} {method}")
                    seed_everything(c.seed)
                    full, theta, kept = quantize(method, ref, X_cal, rtn_group_size=c.rtn_group_size,
                                                 mixed_size=c.mixed_size)
                    report = robustness_report(ref, full, (X, Y), theta=theta, input_shape=INPUT_SHAPE,
                                               per_layer=c.per_layer,
                                               activations_quantized=method in ACTIVATIONS_QUANTIZED,
                                               name=f"{tag}, {method}")
                    report.save(out / f"{tag}-{method}")
                    row = {"model": name, "sparsity": float(sp), "method": method, "quantized": METHODS[method],
                           "quantized_weights": quantized_weight_fraction(ref, theta),
                           "float_layers": " ".join(kept), **_report_columns(report),
                           "calibration": cal_note if method in CALIBRATED else "none (weight-only: no data)"}
                    rows.append(row)
                    _write(rows, out, c.data, len(X))  # after every row: an interrupted run keeps what it did
                    log(f"{tag:18s} {method:16s} top-1 ref {row['top1_reference']:.2f}%  full {row['top1_full']:.2f}%"
                        f"  weights-only {row['top1_weights_only']:.2f}%  D/||Phi|| {row['D_relative']:.3g}  observed "
                        f"{row['observed_max']:.3g} <= certified 1e{row['log10_certified_bound']:.2f}  full model "
                        f"{row['full_observed_max']:.3g} (not certified)  ({time.perf_counter() - t0:.0f} s)")
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    paths = _write(rows, out, c.data, len(X))
    log(f"wrote {', '.join(str(p) for p in paths.values())}, {out / 'quantization.png'} and {len(rows)} reports")
    return rows


def _write(rows, out, data, n):
    title = f"Quantization of CIFAR-10 ResNets ({data}, {n} images): certified weight deviation vs observed deviation"
    paths = write_table(rows, out, "quantization", title, COLUMNS, FORMATS)
    with open(paths["md"], "a") as f:
        f.write(NOTES)
    plot(rows, out / "quantization.png", f"CIFAR-10 {data} ({n} images)")
    return paths


NOTES = """
*top1_full*, *full_observed_max/mean*: the quantized model as produced, activations quantized where the
method does: **measured on this data, NOT certified**. *top1_weights_only*, *observed_max/mean*: the
reference architecture holding the effective (dequantized) weights; each image's deviation was checked
against its certified bound max(1, ||x||_inf) * D (*observed_to_certified* is the largest ratio).
*log10_certified_bound* is log10 of max over the images of that bound. RTN (INC weight-only) quantizes
nn.Linear layers only (INC 3.10: on ResNet-20 640 of 268,336 weights; *quantized_weights* is the fraction of
conv/linear weights changed): the convolutions stay float, and there is no activation quantization, so there
the full model is the weights-only model; the same holds for NNCF compress_weights (nncf-w8, nncf-w4). The
mixed methods keep *float_layers* float, chosen by the certificate (largest single-layer certified distance
per weight, pathsaliency.layer_distances) so that the weights take at most --mixed-size of their float size.
For pruned rows the reference is the pruned float network.
"""


def _report_columns(r) -> dict:
    """The table's columns taken from the robustness report ``r`` of one row."""
    return {"activations_quantized": r.activations_quantized, "top1_reference": r.accuracy_reference,
            "top1_full": r.full_accuracy, "top1_weights_only": r.accuracy_compressed,
            "log10_path_norm": r.log10_path_norm, "log10_D": r.log10_distance, "exact": r.exact,
            "D_relative": r.relative_distance, "log10_certified_bound": r.log10_certified_bound,
            "observed_max": r.observed_max, "observed_mean": r.observed_mean,
            "observed_to_certified": r.observed_to_certified, "full_observed_max": r.full_observed_max,
            "full_observed_mean": r.full_observed_mean}


def _quiet_frameworks(methods):
    """Import the integrations ``methods`` need (an ImportError names the missing extra before any work) and
    keep their frameworks' logging to warnings (INC logs every step at INFO level)."""
    if any(m.startswith("nncf-") for m in methods):
        from pathsaliency.integrations import nncf  # noqa: F401
    if any(m.startswith("inc-") for m in methods):
        from pathsaliency.integrations import neural_compressor  # noqa: F401
    for name in ("neural_compressor", "nncf"):
        logging.getLogger(name).setLevel(logging.WARNING)


def plot(rows, path, subtitle=""):
    """Certified relative distance D/||Phi|| (x) against the observed max deviation (y): filled markers for
    the weights-only model (certified), open markers for the full model (activations quantized, measured)."""
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    configs = sorted({(r["model"], r["sparsity"]) for r in rows})
    markers = dict(zip(configs, "os^Dvp<>h*"))
    fig, axes = figure(panel=(8, 5.5))
    ax = axes[0, 0]
    for r in rows:
        x = r["D_relative"]
        if not (x > 0 and math.isfinite(x)):
            continue
        c, mk = colors[r["method"]], markers.get((r["model"], r["sparsity"]), "o")
        ax.scatter([x], [max(r["observed_max"], 1e-12)], color=c, marker=mk, s=50)
        if r["activations_quantized"] and r["full_observed_max"] is not None:
            ax.scatter([x], [max(r["full_observed_max"], 1e-12)], facecolors="none", edgecolors=c, marker=mk, s=70)
            ax.plot([x, x], [max(r["observed_max"], 1e-12), max(r["full_observed_max"], 1e-12)], color=c, lw=0.6,
                    ls=":")
    for m, c in colors.items():
        if any(r["method"] == m for r in rows):
            ax.scatter([], [], color=c, marker="s", label=m)
    for (name, sp), mk in markers.items():
        ax.scatter([], [], color="gray", marker=mk, label=f"{name}, {'dense' if sp == 0 else f'pruned {sp:.0%}'}")
    ax.scatter([], [], facecolors="none", edgecolors="gray", marker="o", label="full model (NOT certified)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    label(ax, f"Quantization: certified weight distance vs observed output deviation. {subtitle}",
          "certified relative distance D / ||Φ(θ)||₁ (weights only)", "observed max ||R_θ(x) − R_θ'(x)||₁ over the data")
    save(fig, path)


def main(argv=None):
    return harness.main(Config, run, argv, prog="python -m pathsaliency.recipes.quantization", description=__doc__,
                        choices={"methods": list(METHODS), "data": ["test", "sample", "torchvision"],
                                 "calibration_data": ["train", "sample"]})


if __name__ == "__main__":
    main()
