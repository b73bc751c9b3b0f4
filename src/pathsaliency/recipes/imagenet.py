"""Unstructured pruning of ImageNet ResNet-18/50: the recipe of ``pathsaliency.recipes.unstructured`` for
users who have ImageNet (and internet for torchvision's weights).

The same comparison as the CIFAR-10 recipe, through its :func:`~pathsaliency.recipes.unstructured.compare`:
each criterion of ``--criteria`` (default: the CIFAR-10 recipe's ``DEFAULT_CRITERIA``) on the network or,
``<criterion> (rescaled)``, on a function-preserving random rescaling of it, at each global sparsity, with top-1, the
certified path-metric ``D`` (exact: pruning is a dominated pair), the certified bound
``max(1, ||x||_inf) * D`` and the observed deviation, checked on every image (a violation stops the run).

Data: an ImageFolder root (``--data DIR``) holding ``val/<class>/<image>`` (and ``train/<class>/<image>``
for ``--finetune-after-epochs`` and for the data-aware criteria: ``--calibration-size`` of its images calibrate
``wanda-lamp``), evaluated at ``--image-size`` (resize to 256/224 of it, centre crop,
ImageNet normalisation). With ``--pretrained`` (torchvision's DEFAULT weights, downloaded once), ``val/``
must hold the 1,000 ImageNet class folders (``n01440764`` ...): their sorted order is torchvision's class
index. Without it the network has random weights and one output per class folder: the code path is
exercised, the accuracies mean nothing. Up to ``--max-memory-gb`` of decoded images are held in memory
(decoded once); more are decoded again for every network evaluated (use ``--workers``).

    python -m pathsaliency.recipes.imagenet --model resnet50 --pretrained --data ~/data/imagenet \\
        --limit 5000 --device cuda --out out/imagenet-resnet50
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import unstructured
from .cifar10 import _interleave
from pathsaliency.criteria import DATA_CRITERIA

from .common import as_tensors, seed_everything, write_table
from . import harness
from .training import finetune

MODELS = ("resnet18", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Config:
    """One ImageNet comparison (every field is a command-line option)."""

    data: str = field(metadata={"help": "ImageFolder root with val/ (and train/ for fine-tuning)"})
    model: str = "resnet18"
    pretrained: bool = field(default=False, metadata={"help": "torchvision's DEFAULT weights (needs internet once)"})
    image_size: int = 224
    limit: Optional[int] = field(default=None, metadata={"help": "use only the first N validation images "
                                                                 "(class-balanced)"})
    batch_size: int = 64
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1), metadata={"help": "DataLoader workers"})
    sparsities: Tuple[float, ...] = (0.1, 0.2, 0.4, 0.6, 0.8)
    criteria: Tuple[str, ...] = unstructured.DEFAULT_CRITERIA
    factors: Tuple[float, ...] = (1, 128, 4096)
    calibration_size: int = field(default=256, metadata={"help": "train/ images (class-balanced, not augmented) "
                                                                 "for the data-aware criteria (wanda-lamp)"})
    finetune_after_epochs: int = field(default=0, metadata={"help": "fine-tune each pruned network on train/ "
                                                                    "(masks kept)"})
    train_limit: Optional[int] = field(default=None, metadata={"help": "use only N training images for fine-tuning"})
    lr: float = field(default=0.001, metadata={"help": "fine-tuning learning rate"})
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu", metadata={
        "help": "where the networks are evaluated and fine-tuned (certificates: on the CPU)"})
    max_memory_gb: float = field(default=2.0, metadata={"help": "hold the decoded validation images in memory up "
                                                                "to this size"})
    seed: int = 0
    out: str = "out/imagenet"
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def transform(image_size: int = 224, train: bool = False):
    """torchvision's ImageNet preprocessing at ``image_size``: resize to ``256/224 * image_size`` and centre
    crop (evaluation), or a random resized crop and flip (training); then ImageNet normalisation."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_folder(root, split: str = "val", image_size: int = 224, train: bool = False, limit=None):
    """``torchvision.datasets.ImageFolder(<root>/<split>)``; ``limit`` keeps the first N images of a
    class-balanced order (classes interleaved), as for CIFAR-10."""
    from torchvision.datasets import ImageFolder

    path = Path(root).expanduser() / split
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: --data must be an ImageFolder root holding {split}/<class>/<image> "
                                "(ImageNet: https://image-net.org/download, validation images sorted into one "
                                "folder per class)")
    ds = ImageFolder(str(path), transform=transform(image_size, train))
    if limit is not None:
        sub = torch.utils.data.Subset(ds, _interleave(ds.targets)[: int(limit)])
        sub.classes = ds.classes
        return sub
    return ds


def load_model(name: str, pretrained: bool = False, num_classes: int = 1000):
    """torchvision's ``name`` in eval mode: DEFAULT weights (downloaded) with ``pretrained``, else random
    weights (torchvision's initialisation, from the current torch seed) with ``num_classes`` outputs."""
    import torchvision

    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if pretrained:
        return torchvision.models.get_model(name, weights="DEFAULT").eval()
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()


def evaluation_data(dataset, *, batch_size=64, workers=4, max_memory_gb=2.0, progress=False):
    """What :func:`unstructured.compare` evaluates on: the decoded ``(X, Y)`` tensors if they take at most
    ``max_memory_gb``, else a DataLoader (the images are then decoded again for every network)."""
    x0, _ = dataset[0]
    if len(dataset) * x0.numel() * x0.element_size() <= max_memory_gb * 2 ** 30:
        return as_tensors(dataset, batch_size=batch_size, workers=workers, progress=progress, desc="decode val")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def run(config: Config, log=print):
    """Run the comparison on one torchvision ResNet; returns the rows (also written to ``config.out`` as
    ``imagenet.{csv,md,json,png}``)."""
    c = config
    seed_everything(c.seed)
    out = Path(c.out)
    val = image_folder(c.data, "val", image_size=c.image_size, limit=c.limit)
    classes = len(val.classes)
    if c.pretrained and classes != 1000:
        log(f"pathsaliency: {c.data}/val has {classes} class folders, not ImageNet's 1,000: the labels do not "
            "match the pretrained outputs, top-1 is meaningless (the certified bounds still hold)")
    net = load_model(c.model, c.pretrained, 1000 if c.pretrained else classes)
    input_shape = (3, c.image_size, c.image_size)
    after = None
    if c.finetune_after_epochs:
        train = image_folder(c.data, "train", image_size=c.image_size, train=True, limit=c.train_limit)

        def after(pruned, masks):
            tuned = finetune(pruned, train, c.finetune_after_epochs, lr=c.lr, batch_size=c.batch_size, masks=masks,
                             device=c.device, workers=c.workers, seed=c.seed, progress=c.progress)
            return tuned.to("cpu")

    calibration = None
    if any(unstructured.CRITERIA[name][0] in DATA_CRITERIA for name in c.criteria):
        calibration = as_tensors(image_folder(c.data, "train", c.image_size, limit=c.calibration_size))[0]
    X = evaluation_data(val, batch_size=c.batch_size, workers=c.workers, max_memory_gb=c.max_memory_gb,
                        progress=c.progress)
    rows = unstructured.compare(c.model, net, X, input_shape, sparsities=c.sparsities, criteria=c.criteria,
                                factors=c.factors, seed=c.seed, finetune_after=after, calibration=calibration,
                                device=c.device, progress=c.progress, log=log)
    weights = "torchvision DEFAULT weights" if c.pretrained else "random weights"
    what = f"{c.model}, {weights}, {len(val)} {data_name(c.data)} val images at {c.image_size}px"
    paths = write_table(rows, out, "imagenet", f"Unstructured pruning on ImageNet ({what})", unstructured.COLUMNS,
                        unstructured.FORMATS)
    unstructured.plot(rows, out / "imagenet.png", f"({what})")
    log(f"wrote {', '.join(str(p) for p in paths.values())}, {out / 'imagenet.png'}")
    return rows


def data_name(root) -> str:
    return Path(root).expanduser().name or str(root)


def main(argv=None):
    return harness.main(Config, run, argv, prog="python -m pathsaliency.recipes.imagenet", description=__doc__,
                        choices={"model": list(MODELS), "criteria": list(unstructured.CRITERIA)})


if __name__ == "__main__":
    main()
