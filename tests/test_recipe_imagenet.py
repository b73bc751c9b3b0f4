"""The ImageNet recipe end to end on a tiny generated ImageFolder (3 classes x 4 images, written with
Pillow), random weights and 64-pixel inputs: the code path users run on ImageNet cannot rot here."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from pathsaliency.recipes import imagenet, unstructured  # noqa: E402

CLASSES = ("n01440764", "n01443537", "n01484850")


def _folder(root, split, per_class=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for c, name in enumerate(CLASSES):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 70 + 6 * i, 90 - 5 * i  # not square, not the crop size: Resize + CenterCrop do work
            pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}")


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    _folder(root, "val")
    _folder(root, "train", seed=1)
    return root


def _check(out, rows, criteria, sparsities, model):
    for ext in ("csv", "md", "json", "png"):
        assert (out / f"imagenet.{ext}").is_file()
    assert json.loads((out / "imagenet.json").read_text()) == rows
    assert [(r["criterion"], r["sparsity"]) for r in rows] == [(c, s) for c in criteria for s in sparsities]
    assert "random weights" in (out / "imagenet.md").read_text()
    for r in rows:
        assert r["model"] == model
        assert r["exact"] is (not r["finetuned"])  # pruning alone: a dominated pair, D exact
        assert 0 <= r["observed_max"] <= r["certified_bound"] and 0 < r["D_relative"]
        assert r["finetuned"] or r["D_relative"] < 1  # pruning removes part of the path-norm
        assert 0 <= r["top1"] <= 100
    by = {(r["criterion"], r["sparsity"]): r for r in rows}
    for s in sparsities:  # path-magnitude is invariant under the rescaling: the same masks
        if ("path-magnitude (rescaled)", s) in by:
            assert by[("path-magnitude (rescaled)", s)]["same_masks_as_unrescaled"] is True
            assert by[("path-magnitude (rescaled)", s)]["top1"] == by[("path-magnitude", s)]["top1"]


def test_imagenet_recipe_resnet18(imagefolder, tmp_path):
    out = tmp_path / "r18"
    imagenet.main(["--model", "resnet18", "--data", str(imagefolder), "--image-size", "64", "--workers", "0",
                   "--batch-size", "5", "--sparsities", "0.5", "--no-progress", "--out", str(out)])
    rows = json.loads((out / "imagenet.json").read_text())
    _check(out, rows, list(unstructured.DEFAULT_CRITERIA), [0.5], "resnet18")
    assert all(r["finetuned"] is False for r in rows)


def test_imagenet_recipe_streamed_and_finetuned(imagefolder, tmp_path):
    """The validation images streamed through a DataLoader (nothing held in memory), each pruned network
    fine-tuned on train/ with its masks kept: D is then an upper bound (case 2), still checked."""
    out = tmp_path / "ft"
    crit = ["magnitude"]
    rows = imagenet.run(imagenet.Config(model="resnet18", data=imagefolder, image_size=32, limit=6, batch_size=4,
                                        workers=0, sparsities=(0.5,), criteria=tuple(crit), finetune_after_epochs=1,
                                        train_limit=8, max_memory_gb=0, out=out, progress=False))
    _check(out, rows, crit, [0.5], "resnet18")
    assert rows[0]["finetuned"] is True


def test_imagenet_models():
    torch.manual_seed(0)
    net = imagenet.load_model("resnet50", num_classes=3)
    assert not net.training
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert imagenet.transform(64)(Image.new("RGB", (90, 70))).shape == (3, 64, 64)


def test_imagenet_recipe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="val"):
        imagenet.run(imagenet.Config(model="resnet18", data=tmp_path, out=tmp_path / "out", progress=False))
    with pytest.raises(ValueError, match="model"):
        imagenet.load_model("vgg16")
    with pytest.raises(SystemExit):
        imagenet.main([])  # --data is required
