"""CIFAR-10 data access for the recipes: JPEG zips, the packaged sample, torchvision as a fallback.

1. :func:`shared_dir` -- the shared folder (``$PATHSALIENCY_SHARED``, default ``../shared``).
2. :class:`CifarZip` -- a Dataset reading ``<split>/<class>/<n>.jpg`` straight from a zip.
3. :func:`cifar10` -- the normalised dataset, from the shared zip, the packaged sample or torchvision.
4. :func:`evaluate` -- top-1 accuracy in percent.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from importlib import resources
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from pathsaliency.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD

__all__ = ["CLASSES", "shared_dir", "CifarZip", "cifar10", "evaluate", "in_ci"]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def shared_dir() -> Path:
    """1. The shared folder: ``$PATHSALIENCY_SHARED`` if set, else ``../shared``."""
    return Path(os.environ.get("PATHSALIENCY_SHARED", "../shared"))


def in_ci() -> bool:
    """True when running under CI (``CI=true``): missing data is then an error, never a fallback."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _interleave(labels: Sequence[int]) -> List[int]:
    """Indices ordered round-robin over classes (class 0's first, class 1's first, ...)."""
    per_class: dict = {}
    for i, y in enumerate(labels):
        per_class.setdefault(int(y), []).append(i)
    queues = [per_class[c] for c in sorted(per_class)]
    order = []
    for k in range(max((len(q) for q in queues), default=0)):
        order.extend(q[k] for q in queues if k < len(q))
    return order


class CifarZip(Dataset):
    """2. Images ``<split>/<class>/<n>.jpg`` decoded with Pillow straight from a zip.

    Label = index of the class folder in the sorted class list. Items come in a deterministic,
    class-balanced order (classes interleaved, files sorted within a class), so ``limit=N`` keeps
    the first N of that order. The zip is opened lazily in each process, so the dataset pickles
    and works with any ``DataLoader(num_workers=...)``.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        split: Optional[str] = None,
        transform: Optional[Callable] = None,
        limit: Optional[int] = None,
    ):
        self.path = str(path)
        self.transform = transform
        with zipfile.ZipFile(self.path) as z:
            names = [n for n in z.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png"))]
        entries = []
        for n in names:
            parts = n.split("/")
            if len(parts) != 3 or (split is not None and parts[0] != split):
                continue
            entries.append((parts[1], n))
        if not entries:
            raise ValueError(f"{self.path}: no images laid out as {split or '<split>'}/<class>/<n>.jpg")
        self.classes = sorted({c for c, _ in entries})
        index = {c: i for i, c in enumerate(self.classes)}
        entries.sort(key=lambda e: (index[e[0]], e[1]))
        labels = [index[c] for c, _ in entries]
        order = _interleave(labels)
        if limit is not None:
            order = order[: int(limit)]
        self.samples: List[Tuple[str, int]] = [(entries[i][1], labels[i]) for i in order]
        self.targets = [y for _, y in self.samples]
        self._zip: Optional[zipfile.ZipFile] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.samples)

    def _file(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def __getitem__(self, i: int):
        name, label = self.samples[i]
        img = Image.open(io.BytesIO(self._file().read(name))).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"CifarZip({self.path!r}, {len(self)} images, {len(self.classes)} classes)"


def _transform(augment: bool):
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def _sample_zip() -> Path:
    ref = resources.files("pathsaliency") / "assets" / "cifar10-sample.zip"
    return Path(str(ref))


def cifar10(
    split: str = "test",
    root: Optional[Union[str, os.PathLike]] = None,
    limit: Optional[int] = None,
    augment: bool = False,
    source: str = "auto",
) -> Dataset:
    """3. CIFAR-10 ``split`` ("test" or "train"), as normalised tensors with labels 0..9.

    ``source``:

    - ``"auto"``: ``<root or shared_dir()>/data/cifar10/<split>.zip`` if it exists; otherwise,
      outside CI, ``torchvision.datasets.CIFAR10(download=True)`` (into ``<root>/data/cifar10``,
      or ``~/.cache/pathsaliency/cifar10`` without ``root``); under CI, FileNotFoundError.
    - ``"zip"``: the zip only (FileNotFoundError if missing).
    - ``"torchvision"``: torchvision's CIFAR-10 (the original PNG-quality images).
    - ``"sample"``: the 1,000-image packaged sample (test split only, 100 per class).

    ``augment`` adds RandomCrop(32, padding=4) and RandomHorizontalFlip (for training).
    ``limit`` keeps the first N images of a class-balanced order.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if source not in ("auto", "zip", "torchvision", "sample"):
        raise ValueError(f"source must be 'auto', 'zip', 'torchvision' or 'sample', got {source!r}")
    transform = _transform(augment)
    if source == "sample":
        if split != "test":
            raise ValueError("the packaged sample holds test images only (split='test')")
        return CifarZip(_sample_zip(), split="test", transform=transform, limit=limit)
    if source in ("auto", "zip"):
        path = Path(root) if root is not None else shared_dir()
        path = path / "data" / "cifar10" / f"{split}.zip"
        if path.is_file():
            return CifarZip(path, split=split, transform=transform, limit=limit)
        if source == "zip" or in_ci():
            raise FileNotFoundError(
                f"CIFAR-10 {split} zip not found at {path.resolve()} "
                "(set PATHSALIENCY_SHARED or pass root=<folder holding data/cifar10/>)"
            )
        print(
            f"pathsaliency: {path} not found; using torchvision.datasets.CIFAR10(download=True) instead",
            file=sys.stderr,
        )
    from torchvision.datasets import CIFAR10

    tv_root = Path(root) / "data" / "cifar10" if root is not None else Path.home() / ".cache" / "pathsaliency" / "cifar10"
    ds = CIFAR10(root=str(tv_root), train=(split == "train"), download=True, transform=transform)
    if limit is not None:
        return Subset(ds, _interleave(ds.targets)[: int(limit)])
    return ds


def evaluate(
    model: torch.nn.Module,
    loader,
    device: Union[str, torch.device] = "cpu",
    max_batches: Optional[int] = None,
    progress: bool = False,
) -> float:
    """4. Top-1 accuracy of ``model`` on ``loader``, in percent.

    Batches are moved to ``device`` (the model must already be there). Runs under
    ``torch.no_grad()`` in eval mode and restores the model's training flag afterwards.
    ``max_batches`` stops early; ``progress`` shows a tqdm bar.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        n = len(loader) if hasattr(loader, "__len__") else None
        batches = tqdm(loader, total=min(n, max_batches) if n and max_batches else n, desc="evaluate")
    try:
        with torch.no_grad():
            for b, (x, y) in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                x, y = x.to(device), torch.as_tensor(y).to(device)
                correct += (model(x).argmax(dim=1) == y).sum().item()
                total += y.numel()
    finally:
        model.train(was_training)
        if progress:
            batches.close()
    if total == 0:
        raise ValueError("evaluate: the loader gave no samples")
    return 100.0 * correct / total
