"""The structured-pruning recipe end to end: CIFAR ResNet-20 on a slice of the packaged sample (with and
without a few fine-tuning steps), the ImageNet code path on a tiny generated ImageFolder with random
weights, the conv form of the option-A shortcut (same function, same path-norm), and the bisection that
puts every importance at the same MACs removed."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torch_pruning")
pytest.importorskip("matplotlib")

import pathsaliency as ps  # noqa: E402
from pathsaliency.models.cifar_resnet import load_cifar_resnet, to_conv_shortcut  # noqa: E402
from pathsaliency.recipes import structured  # noqa: E402
from pathsaliency.recipes.cifar10 import cifar10, shared_dir  # noqa: E402

FILES = ("structured.csv", "structured.md", "structured.json", "structured.png")
QUIET = dict(workers=0, progress=False, train_data="sample", bn_images=64, bisection_steps=5, macs_tolerance=0.03)


def _run(tmp_path, **kw):
    """The recipe on the packaged sample (no download), few images, a short bisection."""
    return structured.run(structured.Config(out=str(tmp_path), **{**QUIET, **kw}), log=lambda *a: None)


def _check_rows(rows, finetuned=False):
    for r in rows:
        assert r["observed_max"] <= r["certified_bound"], r
        assert r["zeroed_vs_pruned"] <= 1e-5, r
        assert 0 < r["macs_removed"] < 1 and 0 < r["params_removed"] < 1, r
        assert r["macs_after"] < r["macs_before"] and 0 < r["D_relative_masks"] <= 1 and r["D_relative"] > 0, r
        assert 0 <= r["top1"] <= 100 and 0 <= r["top1_one_shot"] <= 100 and r["bn_reestimated"]
        if finetuned:
            assert 0 <= r["top1_finetuned"] <= 100
            assert r["finetuned_observed_max"] <= r["finetuned_certified_bound"], r
        else:
            assert r["top1_finetuned"] == ""


def test_conv_shortcut_keeps_function_path_norm_and_costs():
    original = load_cifar_resnet("resnet20")
    converted = to_conv_shortcut(original)
    x = torch.stack([cifar10("test", source="sample", limit=16)[i][0] for i in range(16)])
    with torch.no_grad():
        assert torch.equal(original(x), converted(x))
    assert ps.path_norm(original, (3, 32, 32), dtype=torch.float64).log2 == pytest.approx(
        ps.path_norm(converted, (3, 32, 32), dtype=torch.float64).log2, abs=1e-12)
    frozen = structured.frozen_shortcut_convs(converted)
    assert len(frozen) == 2 and not any(m.weight.requires_grad for m in frozen)
    # the reported costs leave the frozen 0/1 convolutions out: those of the option-A form
    assert structured.costs(converted, (3, 32, 32), frozen) == structured.costs(original, (3, 32, 32))


def test_frozen_shortcut_channels_follow_the_residual_streams():
    spec = structured.load_spec("resnet20", structured.Config(data="sample", limit=32, **QUIET), log=lambda *a: None)
    pruned, tracker = structured.prune(spec, "l1", "local", 0.25)
    sc2, sc3 = (m.conv for m in (pruned.layer2[0].shortcut, pruned.layer3[0].shortcut))
    # the stage-2 and stage-3 streams lost channels, and the frozen shortcuts lost the matching rows/columns
    assert pruned.layer2[0].conv2.out_channels == sc2.out_channels == 24
    assert pruned.layer3[0].conv2.out_channels == sc3.out_channels == 48
    assert sc2.in_channels == pruned.layer1[0].conv2.out_channels == 12 == sc3.in_channels // 2
    assert not sc2.weight.requires_grad and not sc3.weight.requires_grad
    # each kept shortcut entry is the original one (a 0/1 selection, never re-learned or re-scaled)
    w = spec.model.layer2[0].shortcut.conv.weight
    kept = w[tracker.out["layer2.0.shortcut.conv"]][:, tracker.inp["layer2.0.shortcut.conv"]]
    assert torch.equal(kept, sc2.weight)


def test_cifar_end_to_end(tmp_path):
    rows = _run(tmp_path, models=("resnet20",), data="sample", limit=100, importances=("path-metric", "l1"),
                macs=(0.3,), scope="both", finetune_epochs=0)
    assert [(r["importance"], r["scope"]) for r in rows] == [("path-metric", "local"), ("path-metric", "global"),
                                                             ("l1", "local"), ("l1", "global")]
    _check_rows(rows)
    for f in FILES:
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "structured.json").read_text()) == json.loads(json.dumps(rows))
    md = (tmp_path / "structured.md").read_text()
    assert "| resnet20 | path-metric | global | 0.30 |" in md
    # local ranking prunes the same number of channels whatever the importance
    assert rows[0]["macs_after"] == rows[2]["macs_after"]
    assert rows[0]["top1_unpruned"] == pytest.approx(rows[2]["top1_unpruned"])


def test_every_importance_runs(tmp_path):
    rows = _run(tmp_path, models=("resnet20",), data="sample", limit=20, importances=structured.IMPORTANCES,
                macs=(0.3,), scope="local", calib_batches=1, calib_batch_size=8, train_limit=8, bisection_steps=2)
    assert [r["importance"] for r in rows] == list(structured.IMPORTANCES)
    _check_rows(rows)


def test_cifar_finetune_steps(tmp_path):
    have_train = (shared_dir() / "data" / "cifar10" / "train.zip").is_file()
    rows = _run(tmp_path, models=("resnet20",), data="sample", limit=100, importances=("l1",), macs=(0.3,),
                scope="local", finetune_epochs=1, train_limit=64, train_data="train" if have_train else "sample",
                finetune_batch_size=16)
    assert len(rows) == 1
    _check_rows(rows, finetuned=True)
    for f in FILES:
        assert (tmp_path / f).is_file()
    assert "top1_finetuned" in (tmp_path / "structured.md").read_text()


def _image_folder(root):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("n0001", "n0002"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(4):
                a = torch.randint(0, 256, (64, 64, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(a).save(d / f"{i}.jpg")
    return root


def test_imagenet_code_path_random_weights(tmp_path):
    data = _image_folder(tmp_path / "imagenet")
    out = tmp_path / "out"
    rows = _run(out, models=("imagenet:resnet18",), imagenet_dir=str(data), image_size=32,
                importances=("path-metric",), macs=(0.3,), scope="global", finetune_epochs=1, finetune_batch_size=4,
                train_data="train", bn_images=8)
    assert len(rows) == 1 and rows[0]["model"] == "imagenet:resnet18"
    _check_rows(rows, finetuned=True)
    for f in FILES:
        assert (out / f).is_file()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        structured.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--iterative-steps" in text and "--macs" in text and "--no-reestimate-bn" in text


@pytest.mark.parametrize("importance, scope", [("l1", "global"), ("path-metric", "global"), ("random", "local")])
def test_bisection_reaches_the_target_macs(importance, scope):
    c = structured.Config(data="sample", limit=8, **{**QUIET, "bisection_steps": 12, "macs_tolerance": 0.01})
    spec = structured.load_spec("resnet20", c, log=lambda *a: None)
    macs0 = structured.costs(spec.model, spec.input_shape, spec.frozen)[0]
    for target in (0.3, 0.5):
        p = structured.prune_to_macs(spec, importance, scope, target, c)
        # the MACs removed are recounted independently on the returned model, at the returned ratio
        macs = structured.costs(p.model, spec.input_shape, structured.frozen_shortcut_convs(p.model))[0]
        assert macs == p.macs and abs((1 - macs / macs0) - target) <= 0.01, (importance, scope, target, p.ratio)
        again, _ = structured.prune(spec, importance, scope, p.ratio, c)
        assert structured.costs(again, spec.input_shape, structured.frozen_shortcut_convs(again))[0] == macs
    with pytest.raises(ValueError, match="MACs removed"):
        structured.prune_to_macs(spec, importance, scope, 1.2, c)


def test_cached_scores_prune_exactly_as_fresh_ones():
    """The bisection's score cache changes nothing: the same channels go at every ratio."""
    c = structured.Config(data="sample", limit=8, **QUIET)
    spec = structured.load_spec("resnet20", c, log=lambda *a: None)
    cache = structured.ScoreCache(structured.make_importance("l2", spec.input_shape, "global"))
    for ratio in (0.2, 0.4):
        fresh = structured.prune(spec, "l2", "global", ratio, c)[1]
        cached = structured.prune(spec, "l2", "global", ratio, c, scores=cache)[1]
        assert all(torch.equal(fresh.out[k], cached.out[k]) for k in fresh.out)
        assert all(torch.equal(fresh.inp[k], cached.inp[k]) for k in fresh.inp)
    assert len(cache.scores) > 0
