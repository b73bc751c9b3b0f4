"""CIFAR-10 ResNets and data: the architecture matches the checkpoints, and they classify CIFAR-10.

Tests marked as needing the shared folder (``$PATHSALIENCY_SHARED``, default ``../shared``) skip
without it outside CI and fail under CI (``CI=true``).
"""

import pickle

import pytest
import torch
import torch.fx
from torch.utils.data import DataLoader, TensorDataset

from pathsaliency.models.cifar_resnet import (
    ShortcutA,
    ShortcutConv,
    load_cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    to_conv_shortcut,
)
from pathsaliency.recipes.cifar10 import _sample_zip, cifar10, evaluate, in_ci, shared_dir

BUILDERS = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56}
# Measured on the 10,000-image JPEG test set: ResNet-20 81.03%, ResNet-32 82.56%.
EXPECTED_TOP1 = {"resnet20": (79.0, 83.5), "resnet32": (80.0, 85.0)}


def _require_shared(*parts):
    path = shared_dir().joinpath(*parts)
    if not path.is_file():
        msg = f"{path} missing (set PATHSALIENCY_SHARED to the shared folder)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_checkpoint_keys_equal_architecture_keys(name):
    ckpt = _require_shared("models", f"cifar10-{name}.th")
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    stripped = {k.removeprefix("module."): v for k, v in sd.items()}
    model = BUILDERS[name]()
    # The checkpoints predate BatchNorm's num_batches_tracked, which load_state_dict fills in.
    assert set(stripped) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(stripped, strict=True)
    loaded = load_cifar_resnet(name, checkpoint=ckpt)  # dict with 'state_dict' and 'module.' keys
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in stripped.items())


def test_packaged_resnet20_is_a_bare_state_dict_equal_to_the_shared_one():
    packaged = load_cifar_resnet("resnet20")
    assert not packaged.training
    ckpt = _require_shared("models", "cifar10-resnet20.th")
    shared = load_cifar_resnet("resnet20", checkpoint=ckpt)
    for k, v in shared.state_dict().items():
        assert torch.equal(packaged.state_dict()[k], v), k


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("shortcut", ["A", "conv"])
def test_fx_trace_computes_the_model(name, shortcut):
    torch.manual_seed(0)
    model = BUILDERS[name](shortcut=shortcut).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_conv_shortcut_computes_option_a():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    for model in (load_cifar_resnet("resnet20"), resnet56().eval()):
        conv = to_conv_shortcut(model)
        assert any(isinstance(m, ShortcutA) for m in model.modules())  # the original is untouched
        assert not any(isinstance(m, ShortcutA) for m in conv.modules())
        frozen = [m.conv.weight for m in conv.modules() if isinstance(m, ShortcutConv)]
        assert len(frozen) == 2 and not any(w.requires_grad for w in frozen)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), model(x), rtol=0, atol=1e-6)
    block_in = torch.randn(8, 16, 32, 32)
    torch.testing.assert_close(ShortcutConv(16, 8)(block_in), ShortcutA(8)(block_in), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def jpeg_test_set():
    """The 10,000 JPEG test images, decoded once for all models."""
    _require_shared("data", "cifar10", "test.zip")
    ds = cifar10("test", source="zip")
    assert len(ds) == 10_000
    xs, ys = zip(*DataLoader(ds, batch_size=500))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_pretrained_top1_on_the_jpeg_test_set(name, jpeg_test_set):
    model = load_cifar_resnet(name, checkpoint=_require_shared("models", f"cifar10-{name}.th"))
    model.train()
    acc = evaluate(model, DataLoader(jpeg_test_set, batch_size=500))
    print(f"{name} top-1 on the 10,000-image JPEG test set: {acc:.2f}%")
    assert model.training  # the training flag is restored
    lo, hi = EXPECTED_TOP1[name]
    assert lo <= acc <= hi


def test_packaged_sample_is_1000_balanced_images_and_resnet20_classifies_it():
    path = _sample_zip()
    assert path.stat().st_size < 2 * 1024 * 1024
    ds = cifar10(source="sample")
    assert len(ds) == 1000
    assert [ds.targets.count(c) for c in range(10)] == [100] * 10
    assert {n.rsplit("/", 1)[1] for n, _ in ds.samples} == {f"{i:04d}.jpg" for i in range(100)}
    acc = evaluate(load_cifar_resnet("resnet20"), DataLoader(ds, batch_size=500))
    print(f"resnet20 top-1 on the packaged 1,000-image sample: {acc:.2f}%")  # measured 80.40
    assert 75.0 <= acc <= 86.0


def test_limit_interleaves_classes_and_workers_see_the_same_data():
    ds = cifar10(source="sample", limit=20)
    assert ds.targets == list(range(10)) * 2
    ds[0]  # opens the zip in this process; pickling must still work
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[3][0], ds[3][0])
    x0, y0 = next(iter(DataLoader(ds, batch_size=20, num_workers=0)))
    x2, y2 = next(iter(DataLoader(ds, batch_size=20, num_workers=2)))
    assert torch.equal(y0, y2) and torch.equal(x0, x2)
    assert x0.shape == (20, 3, 32, 32)


def test_missing_shared_data_under_ci_raises(monkeypatch, tmp_path):
    missing = tmp_path / "no-shared-here"
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PATHSALIENCY_SHARED", str(missing))
    with pytest.raises(FileNotFoundError, match="no-shared-here"):
        cifar10("test")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_cifar_resnet("resnet32")
