"""Per-weight path-magnitude (MATH.md section 6) and unstructured pruning."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import pathsaliency as ps
from pathsaliency.errors import PathSaliencyError
from pathsaliency.models.cifar_resnet import resnet20
from pathsaliency.pruning import masks_from_scores


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2)).double().eval()
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    m[1].weight.data.uniform_(-1, 1)
    return m


def test_each_weight_score_is_the_path_norm_lost_by_zeroing_it(assert_untouched):
    m, shape = _small_cnn(), (2, 6, 6)
    with assert_untouched(m):
        scores = ps.path_magnitude(m, shape, dtype=torch.float64)
    norm = ps.path_norm(m, shape, dtype=torch.float64).value
    assert float(scores.scale) == pytest.approx(norm, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    for name in ("0.weight", "4.weight", "7.weight"):
        w = dict(m.named_parameters())[name]
        for _ in range(6):
            i = tuple(int(torch.randint(s, (1,), generator=g)) for s in w.shape)
            cut = copy.deepcopy(m)
            with torch.no_grad():
                dict(cut.named_parameters())[name][i] = 0
            lost = norm - ps.path_norm(cut, shape, dtype=torch.float64).value
            assert float(scores[name][i]) * norm == pytest.approx(lost, rel=1e-9, abs=1e-12 * norm)


def test_scores_are_identical_after_a_power_of_two_rescaling_and_magnitudes_are_not(one_thread):
    m = torchvision.models.resnet18(num_classes=10).eval()
    r = ps.random_rescale(m, generator=torch.Generator().manual_seed(3))
    a, b = ps.path_magnitude(m, (3, 32, 32)), ps.path_magnitude(r, (3, 32, 32))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    mags = {k: dict(m.named_parameters())[k].detach().abs() for k in a}
    mags_r = {k: dict(r.named_parameters())[k].detach().abs() for k in a}
    assert any(not torch.equal(mags[k], mags_r[k]) for k in a)


def test_prune_unstructured_global_and_local_with_exact_counts(assert_untouched):
    m = resnet20().eval()
    with assert_untouched(m):
        pruned, masks = ps.prune_unstructured(m, 0.3, (3, 32, 32))
        local, local_masks = ps.prune_unstructured(m, 0.3, (3, 32, 32), scope="local")
    total = sum(k.numel() for k in masks.values())
    assert sum(int((~k).sum()) for k in masks.values()) == round(0.3 * total)
    for name, k in local_masks.items():
        assert int((~k).sum()) == round(0.3 * k.numel()), name
    params = dict(pruned.named_parameters())
    for name, k in masks.items():
        assert torch.all(params[name][~k] == 0)
    d = ps.path_metric(m, pruned, (3, 32, 32))
    assert d.exact and 0 < d.relative < 1


def test_prune_unstructured_through_torch_nn_utils_prune():
    m = resnet20().eval()
    pruned, masks = ps.prune_unstructured(m, 0.5, (3, 32, 32), use_torch_prune=True)
    conv = pruned.layer1[0].conv1
    assert hasattr(conv, "weight_orig") and torch.equal(conv.weight_mask.bool(), masks["layer1.0.conv1.weight"])
    assert torch.all(conv.weight[~masks["layer1.0.conv1.weight"]] == 0)


def test_rescaling_attack_changes_magnitude_masks_but_not_path_magnitude_masks():
    m = resnet20().eval()
    r = ps.random_rescale(m, generator=torch.Generator().manual_seed(0))
    _, pm = ps.prune_unstructured(m, 0.6, (3, 32, 32), criterion="path-magnitude")
    _, pm_r = ps.prune_unstructured(r, 0.6, (3, 32, 32), criterion="path-magnitude")
    _, mg = ps.prune_unstructured(m, 0.6, criterion="magnitude")
    _, mg_r = ps.prune_unstructured(r, 0.6, criterion="magnitude")
    assert all(torch.equal(pm[k], pm_r[k]) for k in pm)
    assert not all(torch.equal(mg[k], mg_r[k]) for k in mg)


def test_masks_from_scores_breaks_ties_by_position_and_checks_arguments():
    s = {"a": torch.zeros(4), "b": torch.ones(2)}
    masks = masks_from_scores(s, 0.5)
    assert masks["a"].tolist() == [False, False, False, True] and masks["b"].tolist() == [True, True]
    with pytest.raises(ValueError):
        masks_from_scores(s, 1.5)
    with pytest.raises(ValueError):
        ps.prune_unstructured(resnet20(), 0.1)  # path-magnitude needs the input shape


class Recurrent(nn.Module):
    """The same linear layer applied twice in a row: a path can use one weight twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rec = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.rec(h))
        h = torch.relu(self.rec(h))
        return self.out(h)


class Siamese(nn.Module):
    """One layer on two parallel halves of the input: no path uses a weight twice."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(2, 3)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.branch(x[:, :2])), torch.relu(self.branch(x[:, 2:]))], 1))


def test_a_module_used_twice_along_one_path_is_refused_not_scored_first_order():
    with pytest.raises(PathSaliencyError, match="rec"):
        ps.path_magnitude(Recurrent(), (3,))


def test_a_module_shared_by_parallel_branches_is_scored_exactly():
    torch.manual_seed(1)
    m = Siamese().double()
    scores = ps.path_magnitude(m, (4,), dtype=torch.float64)
    norm = ps.path_norm(m, (4,), dtype=torch.float64).value
    for i in [(0, 0), (2, 1)]:
        cut = copy.deepcopy(m)
        with torch.no_grad():
            cut.branch.weight[i] = 0
        lost = norm - ps.path_norm(cut, (4,), dtype=torch.float64).value
        assert float(scores["branch.weight"][i]) * norm == pytest.approx(lost, rel=1e-9)


def test_resnet152_scores_are_finite_positive_and_agree_with_float64():
    """The path-norm of a ResNet-152 is far beyond float32; relative scores stay finite and ordered."""
    torch.manual_seed(0)
    m = torchvision.models.resnet152().eval()
    s32 = ps.path_magnitude(m, (3, 64, 64))  # every kernel tap sees real pixels somewhere
    s64 = ps.path_magnitude(m, (3, 64, 64), dtype=torch.float64)
    assert s32.scale.log10 > 100 and s32.scale.log10 == pytest.approx(s64.scale.log10, rel=1e-6)
    params = dict(m.named_parameters())
    for name in s32:
        a, b = s32[name].double(), s64[name]
        assert torch.isfinite(a).all()
        assert torch.all((a > 0) == (params[name].detach() != 0)), name
        assert torch.allclose(a, b, rtol=1e-3, atol=0), name
