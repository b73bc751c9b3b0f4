"""Unstructured pruning of ImageNet ResNet-18/50: the recipe of ``pathsaliency.recipes.unstructured`` for
users who have ImageNet (and internet for torchvision's weights).

The same comparison as the CIFAR-10 recipe, through its :func:`~pathsaliency.recipes.unstructured.compare`:
``path-magnitude`` and ``magnitude`` on the network, ``magnitude (rescaled)`` and ``path-magnitude
(rescaled)`` on a function-preserving random rescaling of it, at each global sparsity, with top-1, the
certified path-metric ``D`` (exact: pruning is a dominated pair), the certified bound
``max(1, ||x||_inf) * D`` and the observed deviation, checked on every image (a violation stops the run).

Data: an ImageFolder root (``--data DIR``) holding ``val/<class>/<image>`` (and ``train/<class>/<image>``
for ``--finetune-after-epochs``), evaluated at ``--image-size`` (resize to 256/224 of it, centre crop,
ImageNet normalisation). With ``--pretrained`` (torchvision's DEFAULT weights, downloaded once), ``val/``
must hold the 1,000 ImageNet class folders (``n01440764`` ...): their sorted order is torchvision's class
index. Without it the network has random weights and one output per class folder: the code path is
exercised, the accuracies mean nothing. Up to ``--max-memory-gb`` of decoded images are held in memory
(decoded once); more are decoded again for every network evaluated (use ``--workers``).

    python -m pathsaliency.recipes.imagenet --model resnet50 --pretrained --data ~/data/imagenet \\
        --limit 5000 --device cuda --out out/imagenet-resnet50
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import unstructured
from .cifar10 import _interleave
from .common import as_tensors, seed_everything, write_table
from .training import finetune

MODELS = ("resnet18", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def evaluation_data(dataset, batch_size=64, workers=4, max_memory_gb=2.0, progress=False):
    """What :func:`unstructured.compare` evaluates on: the decoded ``(X, Y)`` tensors if they take at most
    ``max_memory_gb``, else a DataLoader (the images are then decoded again for every network)."""
    x0, _ = dataset[0]
    if len(dataset) * x0.numel() * x0.element_size() <= max_memory_gb * 2 ** 30:
        return as_tensors(dataset, batch_size=batch_size, workers=workers, progress=progress, desc="decode val")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def run(model="resnet18", data=None, pretrained=False, image_size=224, limit=None, batch_size=64, workers=4,
        sparsities=(0.1, 0.2, 0.4, 0.6, 0.8), criteria=unstructured.DEFAULT_CRITERIA, factors=(1, 128, 4096),
        finetune_after_epochs=0, train_limit=None, lr=0.001, device="cpu", max_memory_gb=2.0, seed=0,
        out="out/imagenet", progress=True, log=print):
    """Run the comparison on one torchvision ResNet; returns the rows (also written to ``out`` as
    ``imagenet.{csv,md,json,png}``)."""
    if data is None:
        raise ValueError("data: the ImageFolder root holding val/<class>/<image> is required")
    seed_everything(seed)
    out = Path(out)
    val = image_folder(data, "val", image_size, limit=limit)
    classes = len(val.classes)
    if pretrained and classes != 1000:
        log(f"pathsaliency: {data}/val has {classes} class folders, not ImageNet's 1,000: the labels do not match "
            "the pretrained outputs, top-1 is meaningless (the certified bounds still hold)")
    net = load_model(model, pretrained, 1000 if pretrained else classes)
    input_shape = (3, image_size, image_size)
    after = None
    if finetune_after_epochs:
        train = image_folder(data, "train", image_size, train=True, limit=train_limit)

        def after(pruned, masks):
            tuned = finetune(pruned, train, finetune_after_epochs, lr=lr, batch_size=batch_size, masks=masks,
                             device=device, workers=workers, seed=seed, progress=progress)
            return tuned.to("cpu")

    X = evaluation_data(val, batch_size, workers, max_memory_gb, progress)
    rows = unstructured.compare(model, net, X, input_shape, sparsities, criteria, factors, seed=seed,
                                finetune_after=after, device=device, progress=progress, log=log)
    weights = "torchvision DEFAULT weights" if pretrained else "random weights"
    what = f"{model}, {weights}, {len(val)} {data_name(data)} val images at {image_size}px"
    paths = write_table(rows, out, "imagenet", f"Unstructured pruning on ImageNet ({what})", unstructured.COLUMNS,
                        unstructured.FORMATS)
    unstructured.plot(rows, out / "imagenet.png", f"({what})")
    log(f"wrote {', '.join(str(p) for p in paths.values())}, {out / 'imagenet.png'}")
    return rows


def data_name(root) -> str:
    return Path(root).expanduser().name or str(root)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m pathsaliency.recipes.imagenet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=list(MODELS))
    p.add_argument("--pretrained", action="store_true", help="torchvision's DEFAULT weights (needs internet once)")
    p.add_argument("--data", required=True, help="ImageFolder root with val/ (and train/ for fine-tuning)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--limit", type=int, help="use only the first N validation images (class-balanced)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.6, 0.8])
    p.add_argument("--criteria", nargs="+", default=list(unstructured.DEFAULT_CRITERIA), choices=list(unstructured.CRITERIA))
    p.add_argument("--factors", type=float, nargs="+", default=[1, 128, 4096])
    p.add_argument("--finetune-after-epochs", type=int, default=0,
                   help="fine-tune each pruned network on train/ (masks kept)")
    p.add_argument("--train-limit", type=int, help="use only N training images for fine-tuning")
    p.add_argument("--lr", type=float, default=0.001, help="fine-tuning learning rate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the networks are evaluated and fine-tuned (certificates: on the CPU)")
    p.add_argument("--max-memory-gb", type=float, default=2.0,
                   help="hold the decoded validation images in memory up to this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/imagenet")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    run(a.model, a.data, a.pretrained, a.image_size, a.limit, a.batch_size, a.workers, a.sparsities, a.criteria,
        a.factors, a.finetune_after_epochs, a.train_limit, a.lr, a.device, a.max_memory_gb, a.seed, a.out,
        progress=not a.no_progress)


if __name__ == "__main__":
    main()
