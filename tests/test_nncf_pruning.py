"""Path-magnitude pruning inside NNCF's unstructured pruning (``pathsaliency.integrations.nncf``).

The masks NNCF holds (``UnstructuredPruningMask.binary_mask``) are exactly
``masks_from_scores(path_magnitude(model), ratio, scope)``; NNCF's statistics, batch-norm
adaptation and strip work on the result; a schedule recomputes the masks with path-magnitude
scores of the current network; the masks do not move under neuron rescaling (NNCF's magnitude
masks do); the certified bound holds for the stripped model on CIFAR-10 images.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

nncf = pytest.importorskip("nncf")
torchvision = pytest.importorskip("torchvision")

import pathsaliency as ps  # noqa: E402
from pathsaliency.models.cifar_resnet import load_cifar_resnet  # noqa: E402
from pathsaliency.pruning import masks_from_scores, unstructured_scores  # noqa: E402
from pathsaliency.integrations import nncf as pn  # noqa: E402
from nncf.torch.function_hook.pruning.magnitude.algo import get_pruned_modules  # noqa: E402
from nncf.torch.function_hook.pruning.magnitude.schedulers import (  # noqa: E402
    ExponentialMagnitudePruningScheduler,
    MultiStepMagnitudePruningScheduler,
)

CIFAR = (3, 32, 32)
IMAGENET_SMALL = (3, 64, 64)


@pytest.fixture(scope="module")
def resnet20():
    return load_cifar_resnet("resnet20").eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def cifar_images():
    from pathsaliency.recipes.cifar10 import cifar10

    data = cifar10("test", source="sample", limit=64)
    x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=64)))
    assert x.shape == (64, 3, 32, 32)
    return x, y


def _strip(pruned):
    """NNCF's strip that applies pruning masks (the default NATIVE format only converts quantizers)."""
    return nncf.strip(pruned, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)


class _Effective:
    """The current effective network of a pruned model, built by the test: a plain copy of the
    reference loaded with the pruned model's parameters times its masks and its buffers (what
    ``_strip`` gives, checked in ``test_nncf_strip_zeroes_exactly_the_masked_weights``), reused
    across steps so that path-magnitude traces it once."""

    def __init__(self, reference):
        self.model = copy.deepcopy(reference)

    @torch.no_grad()
    def __call__(self, pruned):
        masks = pn.pruning_masks(pruned)
        state = pruned.state_dict()
        for name, t in self.model.state_dict(keep_vars=True).items():
            value = state[name]
            t.copy_(value * masks[name] if name in masks else value)
        return self.model


def _expected_update(pruned, ratio, scope, shape, effective=None):
    """What ``update_pruning_ratio`` must give: path-magnitude of the current effective network
    (NNCF's strip, or ``effective``); currently masked weights rank first (they score 0 there).
    Also returns the plain ``masks_from_scores`` and whether the two must agree (no more zero scores
    than weights to remove, so the tie rule cannot matter)."""
    current = pn.pruning_masks(pruned)
    network = _strip(pruned) if effective is None else effective(pruned)
    with torch.enable_grad():  # path_magnitude differentiates; the caller may be under no_grad
        scores = ps.path_magnitude(network, shape)
    scores = {k: scores[k] for k in scores if k in current}
    ranking = {k: torch.where(current[k], s.double(), torch.full_like(s.double(), -1.0)) for k, s in scores.items()}
    plain = masks_from_scores(scores, ratio, scope)
    groups = [list(scores)] if scope == "global" else [[k] for k in scores]
    same = all(
        sum(int((scores[k] == 0).sum()) for k in g) <= round(ratio * sum(scores[k].numel() for k in g)) for g in groups
    )
    return masks_from_scores(ranking, ratio, scope), plain, same


def _assert_masks_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].bool(), b[k].bool()), k


_SCORES = {}


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
def test_nncf_masks_are_path_magnitude_masks(arch, scope, request, assert_untouched):
    model = request.getfixturevalue(arch)
    shape = CIFAR if arch == "resnet20" else IMAGENET_SMALL
    ratio = 0.7
    with assert_untouched(model):
        pruned = pn.prune(model, ratio, shape, scope=scope)
        if arch not in _SCORES:
            _SCORES[arch] = ps.path_magnitude(model, shape)
    expected = masks_from_scores(_SCORES[arch], ratio, scope)
    assert pruned is not model and type(pruned) is type(model)
    hooks = get_pruned_modules(pruned)  # NNCF's own view of its UnstructuredPruningMask hooks
    assert set(hooks) == set(expected)  # NNCF's constant names are the parameter names
    _assert_masks_equal({k: h.binary_mask for k, h in hooks.items()}, expected)

    stat = nncf.pruning_statistic(pruned)
    total = sum(m.numel() for m in expected.values())
    pruned_count = sum(int((~m).sum()) for m in expected.values())
    assert stat.pruning_ratio == pytest.approx(pruned_count / total)
    if scope == "global":
        assert pruned_count == round(ratio * total)
    else:
        for t in stat.pruned_tensors:
            n = expected[t.tensor_name].numel()
            assert t.pruned_ratio == pytest.approx(round(ratio * n) / n)
    assert stat.pruning_ratio == pytest.approx(ratio, abs=1e-3)


def test_nncf_strip_zeroes_exactly_the_masked_weights(resnet20):
    pruned = pn.prune(resnet20, 0.6, CIFAR)
    masks = pn.pruning_masks(pruned)
    stripped = _strip(pruned)
    assert not get_pruned_modules(stripped)  # no pruning hooks left: a plain model
    ref = dict(resnet20.named_parameters())
    for name, value in stripped.named_parameters():
        if name in masks:
            assert torch.equal(value == 0, ~masks[name] | (ref[name] == 0)), name
            assert torch.equal(value, torch.where(masks[name], ref[name], torch.zeros_like(ref[name]))), name
        else:
            assert torch.equal(value, ref[name]), name
    x = torch.randn(4, *CIFAR)
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), pruned(x), rtol=1e-5, atol=1e-5)
    # the tests' own effective network (used by the scheduler test) is NNCF's strip
    effective = _Effective(resnet20)(pruned)
    for name, value in effective.state_dict().items():
        assert torch.equal(value, stripped.state_dict()[name]), name


def test_nncf_batch_norm_adaptation_and_certified_bound_on_cifar(resnet20, cifar_images, assert_untouched):
    x, _ = cifar_images
    with assert_untouched(resnet20):
        pruned = pn.prune(resnet20, 0.5, CIFAR)
    masks = pn.pruning_masks(pruned)

    # dominated pair (weights only zeroed): the certificate is exact, case 1
    stripped = _strip(pruned)
    metric = ps.path_metric(resnet20, stripped, CIFAR)
    assert metric.exact and 0 < metric.relative < 1
    with torch.no_grad():
        observed = (resnet20(x) - stripped(x)).abs().sum(1).double()
    bound = ps.lipschitz_bound(resnet20, stripped, x)
    assert bool(torch.all(observed <= bound * (1 + 1e-6)))

    # NNCF's batch-norm adaptation on real CIFAR-10 images, through the masked forward
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*cifar_images), batch_size=16)
    before = {k: v.clone() for k, v in pruned.state_dict().items() if "running" in k}
    adapted = nncf.batch_norm_adaptation(pruned, nncf.Dataset(loader, lambda batch: batch[0]), num_iterations=4)
    assert adapted is pruned and not pruned.training
    assert any(not torch.equal(before[k], v) for k, v in pruned.state_dict().items() if k in before)
    _assert_masks_equal(pn.pruning_masks(pruned), masks)

    stripped = _strip(pruned)  # batch-norm statistics moved: no longer a dominated pair (case 2)
    with torch.no_grad():
        observed = (resnet20(x) - stripped(x)).abs().sum(1).double()
    bound = ps.lipschitz_bound(resnet20, stripped, x)
    assert bool(torch.all(observed <= bound * (1 + 1e-6))), (observed / bound).max()
    # and the adapted network really is what later updates score
    expected, _, _ = _expected_update(pruned, 0.6, "global", CIFAR)
    _assert_masks_equal(pn.update_pruning_ratio(pruned, 0.6), expected)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_nncf_schedulers_recompute_path_magnitude_masks(resnet20, scope):
    pruned = pn.prune(resnet20, 0.3, CIFAR, scope=scope)
    effective = _Effective(resnet20)
    scheduler = pn.PathMagnitudeMultiStepScheduler(pruned, steps={0: 0.3, 1: 0.5, 2: 0.8})
    assert isinstance(scheduler, MultiStepMagnitudePruningScheduler)
    assert scheduler.mode == pn.pruning._SCOPE_TO_MODE[scope]
    previous = pn.pruning_masks(pruned)
    ratios = []
    with torch.no_grad():  # a training loop may step it anywhere
        for _ in range(3):
            ratio = scheduler.get_pruning_ratio(scheduler.epoch)
            expected, plain, same = _expected_update(pruned, ratio, scope, CIFAR, effective)
            scheduler.step()
            masks = pn.pruning_masks(pruned)
            _assert_masks_equal(masks, expected)
            if same:
                _assert_masks_equal(masks, plain)
            assert all(bool((masks[k] <= previous[k]).all()) for k in masks)  # nested: pruned stays pruned
            assert nncf.pruning_statistic(pruned).pruning_ratio == pytest.approx(scheduler.current_ratio, abs=1e-3)
            ratios.append(scheduler.current_ratio)
            previous = masks
    assert ratios == [0.3, 0.5, 0.8]

    exponential = pn.PathMagnitudeExponentialScheduler(pruned, initial_ratio=0.8, target_ratio=0.9, target_epoch=2)
    assert isinstance(exponential, ExponentialMagnitudePruningScheduler)
    for epoch in (1, None):
        ratio = exponential.get_pruning_ratio(exponential.epoch if epoch is None else epoch)
        expected, _, _ = _expected_update(pruned, ratio, scope, CIFAR, effective)
        exponential.step(epoch)
        masks = pn.pruning_masks(pruned)
        _assert_masks_equal(masks, expected)
        assert all(bool((masks[k] <= previous[k]).all()) for k in masks)
        previous = masks
    assert exponential.current_ratio == 0.9

    # lowering the ratio brings weights back, keeping the rest pruned
    masks = pn.update_pruning_ratio(pruned, 0.4)
    assert all(bool((masks[k] >= previous[k]).all()) for k in masks)
    assert nncf.pruning_statistic(pruned).pruning_ratio == pytest.approx(0.4, abs=1e-3)


def test_nncf_path_magnitude_masks_are_rescaling_invariant(resnet20):
    model, shape = resnet20, CIFAR
    rescaled = ps.random_rescale(model, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, *shape)
    with torch.no_grad():  # the same function
        torch.testing.assert_close(rescaled(x), model(x), rtol=1e-4, atol=1e-4)
    ratio = 0.6
    _assert_masks_equal(pn.pruning_masks(pn.prune(model, ratio, shape)), pn.pruning_masks(pn.prune(rescaled, ratio, shape)))

    def nncf_magnitude(m):
        example = torch.zeros(1, *shape)
        pruned = nncf.prune(copy.deepcopy(m), nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL, ratio=ratio, examples_inputs=example)
        return {k: h.binary_mask.clone() for k, h in get_pruned_modules(pruned).items()}

    a, b = nncf_magnitude(model), nncf_magnitude(rescaled)
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("criterion", ["wanda-lamp", "norm-matched"])
def test_nncf_masks_of_the_invariant_criteria(resnet20, assert_untouched, criterion):
    """An invariant criterion (the data-aware wanda-lamp, the default norm-matched, which ignores the
    calibration): NNCF's masks are the library's masks, identical on a rescaled copy, and a scheduler-style
    update to a higher ratio nests them (scores of the current masked network)."""
    model, shape = resnet20, CIFAR
    calib = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    with assert_untouched(model):
        pruned = pn.prune(model, 0.5, shape, criterion=criterion, calibration=calib)
    expected = masks_from_scores(unstructured_scores(model, shape, criterion, calibration=calib), 0.5)
    masks = pn.pruning_masks(pruned)
    _assert_masks_equal(masks, expected)
    rescaled = ps.random_rescale(model, generator=torch.Generator().manual_seed(1))
    _assert_masks_equal(pn.pruning_masks(pn.prune(rescaled, 0.5, shape, criterion=criterion, calibration=calib)),
                        masks)
    later = pn.update_pruning_ratio(pruned, 0.7)
    assert all(bool((later[k] <= masks[k]).all()) for k in masks)  # nested: nothing masked comes back
    total = sum(m.numel() for m in later.values())
    assert sum(int((~m).sum()) for m in later.values()) == round(0.7 * total)
    with pytest.raises(ValueError, match="criterion must be one of"):
        pn.prune(model, 0.5, shape, criterion="wanda-lam")


class _DeadBranch(nn.Module):
    """A conv that runs but does not reach the output: NNCF prunes it, path-magnitude cannot score it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.dead = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        self.dead(x)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_nncf_unscored_weights_are_an_error_and_ignored_scope_fixes_it(assert_untouched):
    torch.manual_seed(0)
    model = _DeadBranch().eval()
    with assert_untouched(model), pytest.raises(ValueError, match=r"dead\.weight.*ignored_scope"):
        pn.prune(model, 0.5, (3, 8, 8))
    pruned = pn.prune(model, 0.5, (3, 8, 8), ignored_scope=nncf.IgnoredScope(names=["dead.weight"]))
    _assert_masks_equal(pn.pruning_masks(pruned), masks_from_scores(ps.path_magnitude(model, (3, 8, 8)), 0.5))


def test_nncf_sequential_and_models_pruned_by_nncf_itself(assert_untouched):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    with assert_untouched(model):
        pruned = pn.prune(model, 0.5, (3, 8, 8), scope="local")
    assert isinstance(pruned, pn.HookSafeSequential)
    _assert_masks_equal(pn.pruning_masks(pruned), masks_from_scores(ps.path_magnitude(model, (3, 8, 8)), 0.5, "local"))
    with torch.no_grad():
        pruned(torch.randn(2, 3, 8, 8))

    # a model pruned by nncf.prune (magnitude masks) switches to path-magnitude updates
    other = nncf.prune(
        pn.HookSafeSequential(*copy.deepcopy(model)),
        nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL,
        ratio=0.3,
        examples_inputs=torch.zeros(1, 3, 8, 8),
    )
    with pytest.raises(ValueError, match="input_shape"):
        pn.update_pruning_ratio(other, 0.5)
    expected, _, _ = _expected_update(other, 0.5, "global", (3, 8, 8))
    _assert_masks_equal(pn.update_pruning_ratio(other, 0.5, (3, 8, 8)), expected)
    with pytest.raises(ValueError, match="no NNCF hooks"):
        pn.update_pruning_ratio(copy.deepcopy(model), 0.5, (3, 8, 8))
