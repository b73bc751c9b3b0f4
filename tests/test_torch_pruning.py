"""torch-pruning integration: ``PathMetricImportance`` scores a group by the path-metric its removal costs.

The identities checked here:

* score * ||Phi(theta)||_1 == ||Phi(theta)||_1 - ||Phi(theta pruned)||_1 for every group of the dependency
  graph and (a sample of) its channels, where "pruned" is torch-pruning's own physical pruning of that one
  channel (grouped convolutions: the channel's copies in every convolution group, as MetaPruner prunes),
  on ResNet-18, VGG-11-BN, DenseNet-, U-Net- and ResNeXt-style models (float64);
* score == path_metric(model, copy with the channel zeroed).relative;
* the scores, and the channels MetaPruner picks, do not change under a function-preserving rescaling
  (torch-pruning's magnitude importance does change its picks);
* MetaPruner with this importance prunes torchvision ResNet-18/50, VGG-16-BN, DenseNet-121 and a U-Net
  (local, global, isomorphic, iterative, round_to) into models that still run;
* with the raw scores (``normalizer=None``) global pruning ranks all groups by one threshold; with the
  default sequential scores it removes the requested ratio (ResNet-18/50, DenseNet; one-shot and
  iterative) and local pruning picks what the raw scores pick; ignored layers are kept;
* no normaliser makes ``GroupNormPruner``'s regularisation NaN;
* removal passes skip only input channels a removal already zeroed (the scores of the full pass);
* MetaPruner's ``round_to`` rounds every group's remaining channels down after the global threshold
  (the U-Net that kept 28 %), and sequential scores told ``round_to`` come in blocks that keep the ratio;
* an exact step shows a progress bar over its removal passes when asked (by default on a terminal).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

tp = pytest.importorskip("torch_pruning")
torchvision = pytest.importorskip("torchvision")

from pathsaliency import path_metric, path_norm, random_rescale  # noqa: E402
from pathsaliency.integrations.torch_pruning import (  # noqa: E402
    PathMetricImportance,
    channel_groups,
    group_removals,
    input_shape_from_graph,
)

F64 = torch.float64



# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def _cbr(i, o, k=3, s=1, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class _DenseLayer(nn.Module):
    def __init__(self, i, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(i)
        self.conv = nn.Conv2d(i, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class TinyDenseNet(nn.Module):
    """DenseNet-style: every layer's output is concatenated and re-read by the batch-norms of all later
    layers (one channel = neurons at several depths)."""

    def __init__(self, growth=4, classes=5):
        super().__init__()
        self.stem = _cbr(3, 8)
        c, layers = 8, []
        for _ in range(3):
            layers.append(_DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1, bias=False), nn.AvgPool2d(2))
        c, layers = 8, []
        for _ in range(2):
            layers.append(_DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1)
        return self.fc(torch.flatten(x, 1))


class TinyUNet(nn.Module):
    """U-Net-style: encoder convs + max-pooling; decoder with nearest upsampling and a transposed conv,
    each followed by a concatenated skip."""

    def __init__(self, c=8, out=2):
        super().__init__()
        self.enc1 = nn.Sequential(_cbr(3, c), _cbr(c, c))
        self.enc2 = _cbr(c, 2 * c)
        self.bott = _cbr(2 * c, 4 * c)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = _cbr(4 * c + 2 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = _cbr(2 * c, c)
        self.head = nn.Conv2d(c, out, 1)

    def forward(self, x):
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        b = self.bott(F.max_pool2d(s2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.head(d1)


class _Bottleneck(nn.Module):
    def __init__(self, i, width, o, groups, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(i, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, o, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(o)
        self.down = None
        if stride != 1 or i != o:
            self.down = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNeXt(nn.Module):
    """ResNeXt-style: grouped 3x3 convs in residual bottlenecks, a depthwise conv, and a flatten of a 2x2
    map before the classifier (one channel = four input features of the linear layer)."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU())
        self.block1 = _Bottleneck(16, 16, 16, groups=4)
        self.block2 = _Bottleneck(16, 32, 32, groups=8, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32 * 4, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.dw(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _vgg11_bn():
    """torchvision VGG-11-BN with a narrow classifier (same flatten of the 7x7 map into the first linear
    layer, 49 features per channel, without 120M float64 parameters)."""
    m = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    m.classifier = nn.Sequential(nn.Linear(512 * 49, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))
    return m


def _randomized(model, seed=0, dtype=F64):
    """Random batch-norm running statistics and affine parameters (and conv biases), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1.0)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.to(dtype).eval()


def _seeded(builder, seed=0):
    torch.manual_seed(seed)
    return builder()


# name -> (builder, input shape, random candidates per group besides the first and the last)
EXACT_MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (3, 16, 16), 1),
    "vgg11_bn": (_vgg11_bn, (3, 32, 32), 1),
    "densenet": (TinyDenseNet, (3, 8, 8), 8),
    "unet": (TinyUNet, (3, 8, 8), 8),
    "resnext": (TinyResNeXt, (3, 8, 8), 8),
}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _graph(model, shape, dtype=F64):
    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *shape, dtype=dtype))


def _root_name(group):
    return group._DG._module2name[group[0].dep.target.module]


def _candidates(group, scores, n_random, rng):
    """Candidate channels ``j`` of a group, with the root indices each one removes (for grouped convs,
    MetaPruner removes ``j, j + n/k, ...`` together)."""
    k = channel_groups(group)
    size = len(scores) // k
    picks = {0, size - 1} | set(rng.sample(range(size), min(n_random, size)))
    return [(j, [j + t * size for t in range(k)]) for j in sorted(picks)]


def _physically_pruned(model, shape, root_name, handler, idxs):
    """A deep copy of ``model`` with ``idxs`` of the group rooted at ``root_name`` removed by
    torch-pruning on the copy's own dependency graph."""
    pruned = copy.deepcopy(model)
    DG = _graph(pruned, shape, next(pruned.parameters()).dtype)
    root = dict(pruned.named_modules())[root_name]
    group = DG.get_pruning_group(root, handler, idxs)
    assert DG.check_pruning_group(group)
    group.prune()
    return pruned


def _zeroed(model, removals, candidate):
    """A copy of ``model`` (same architecture) whose parameters of ``candidate``'s channels are zero."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for r in removals:
            m = mods[r.module]
            for c in r.index[r.candidate == candidate].tolist():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight[c] = 0
                    m.bias[c] = 0
                elif isinstance(m, nn.Linear):
                    if r.side == "out":
                        m.weight[c] = 0
                        if m.bias is not None:
                            m.bias[c] = 0
                    else:
                        m.weight[:, c] = 0
                elif isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, *k)
                    assert m.groups == 1
                    if r.side == "out":
                        m.weight[:, c] = 0
                        if m.bias is not None:
                            m.bias[c] = 0
                    else:
                        m.weight[c] = 0
                else:  # conv: weight (out, in / groups, *k)
                    if r.side == "out":
                        m.weight[c] = 0
                        if m.bias is not None:
                            m.bias[c] = 0
                    else:
                        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
                        g = c // per_in
                        m.weight[g * per_out:(g + 1) * per_out, c % per_in] = 0
    return out


def _assert_score_is_loss(score, n0, lost, where):
    # lost = n0 - n1 carries the rounding of n0 (cancellation): allow a few ulps of n0 on top of 1e-9.
    tol = 1e-9 * abs(lost) + 32 * torch.finfo(F64).eps * n0
    assert abs(score * n0 - lost) <= tol, (f"{where}: score * ||Phi|| = {score * n0!r}, "
                                           f"||Phi|| - ||Phi(pruned)|| = {lost!r}")


# ----------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXACT_MODELS))
def test_score_times_path_norm_equals_path_norm_lost_by_physical_pruning(name):
    builder, shape, n_random = EXACT_MODELS[name]
    model = _randomized(_seeded(builder))
    DG = _graph(model, shape)
    imp = PathMetricImportance(dtype=F64, normalizer=None)  # input shape read from the graph
    n0 = float(path_norm(model, shape, dtype=F64))
    rng = random.Random(0)
    checked = 0
    for group in DG.get_all_groups():
        scores = imp(group)
        assert scores.dtype == F64 and scores.shape == (len(group[0].idxs),)
        assert bool((scores >= 0).all())
        for j, idxs in _candidates(group, scores, n_random, rng):
            # every root index that MetaPruner removes together carries the score of the joint removal
            assert all(float(scores[i]) == float(scores[j]) for i in idxs)
            pruned = _physically_pruned(model, shape, _root_name(group), group[0].dep.handler, idxs)
            lost = n0 - float(path_norm(pruned, shape, dtype=F64))
            _assert_score_is_loss(float(scores[j]), n0, lost, f"{name}: group {_root_name(group)}, channel {j}")
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name", ["densenet", "unet", "resnext"])
def test_score_is_the_relative_path_metric_to_the_copy_with_the_channel_zeroed(name):
    builder, shape, _ = EXACT_MODELS[name]
    model = _randomized(_seeded(builder, seed=1), seed=1)
    DG = _graph(model, shape)
    imp = PathMetricImportance(input_shape=shape, dtype=F64, normalizer=None)
    rng = random.Random(1)
    for group in DG.get_all_groups():
        if channel_groups(group) > 1:
            continue  # candidates of grouped convs are covered by the physical-pruning test
        scores = imp(group)
        removals = group_removals(group)
        for j in sorted({0, len(scores) - 1, rng.randrange(len(scores))}):
            d = path_metric(model, _zeroed(model, removals, j), shape, dtype=F64)
            assert d.exact
            assert d.relative == pytest.approx(float(scores[j]), rel=1e-9, abs=1e-15)


def test_first_order_scores_equal_exact_on_antichains_and_overcount_on_residual_streams():
    model = _randomized(_seeded(EXACT_MODELS["resnext"][0]))
    shape = (3, 8, 8)
    DG = _graph(model, shape)
    exact = PathMetricImportance(dtype=F64, normalizer=None)
    first = PathMetricImportance(dtype=F64, exact=False, normalizer=None)
    overcounted = 0
    for group in DG.get_all_groups():
        a, b = exact(group), first(group)
        assert bool((b >= a * (1 - 1e-12)).all())  # first order never under-counts
        modules = {r.module for r in group_removals(group) if r.side == "out"}
        if len(modules) <= 2:  # one conv (+ its batch-norm): an antichain
            assert torch.allclose(a, b, rtol=1e-12, atol=0)
        elif bool((b > a * (1 + 1e-6)).any()):
            overcounted += 1
    assert overcounted >= 1  # the residual streams


def test_importance_reads_the_model_without_modifying_it(assert_untouched):
    model = _randomized(_seeded(TinyResNeXt))
    DG = _graph(model, (3, 8, 8))
    imp = PathMetricImportance()
    groups = list(DG.get_all_groups())
    with assert_untouched(model):
        for group in groups:
            imp(group)


# ----------------------------------------------------------------------------------------------------
# Iterative pruning: the model changes shape, the scores follow
# ----------------------------------------------------------------------------------------------------


def test_iterative_pruning_rescores_the_reshaped_model_exactly():
    shape = (3, 8, 8)
    model = _randomized(_seeded(TinyResNeXt))
    imp = PathMetricImportance(dtype=F64, normalizer=None)
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *shape, dtype=F64), importance=imp, pruning_ratio=0.5,
                                  iterative_steps=2, ignored_layers=[model.fc])
    widths = []
    for step in range(2):
        pruner.step()
        widths.append(sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)))
        with torch.no_grad():
            assert model(torch.randn(2, *shape, dtype=F64)).shape == (2, 5)
        n0 = float(path_norm(model, shape, dtype=F64))
        fresh = copy.deepcopy(model)  # a new object: nothing cached for it
        fresh_DG = _graph(fresh, shape)
        fresh_groups = {_root_name(g): g for g in fresh_DG.get_all_groups()}
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers):
            scores = imp(group)  # the pruner's own graph after pruning, cached importance object
            torch.testing.assert_close(scores, PathMetricImportance(dtype=F64, normalizer=None)(fresh_groups[_root_name(group)]),
                                       rtol=1e-12, atol=0)
            for j, idxs in _candidates(group, scores, 0, random.Random(step)):
                pruned = _physically_pruned(model, shape, _root_name(group), group[0].dep.handler, idxs)
                lost = n0 - float(path_norm(pruned, shape, dtype=F64))
                _assert_score_is_loss(float(scores[j]), n0, lost, f"step {step}: {_root_name(group)}[{j}]")
    assert widths[0] > widths[1]


def test_scores_follow_in_place_weight_changes():
    shape = (3, 8, 8)
    model = _randomized(_seeded(TinyUNet))
    DG = _graph(model, shape)
    imp = PathMetricImportance(dtype=F64, normalizer=None)
    group = DG.get_pruning_group(model.enc2[0], tp.prune_conv_out_channels, list(range(16)))
    before = imp(group)
    with torch.no_grad():
        model.enc2[1].weight[3] *= 10.0  # channel 3 now carries more of the path-norm
    after = imp(group)
    fresh_model = copy.deepcopy(model)
    fresh = PathMetricImportance(dtype=F64, normalizer=None)(
        _graph(fresh_model, shape).get_pruning_group(fresh_model.enc2[0], tp.prune_conv_out_channels,
                                                     list(range(16))))
    assert torch.equal(after, fresh)
    assert float(after[3]) > float(before[3])


# ----------------------------------------------------------------------------------------------------
# Rescaling invariance
# ----------------------------------------------------------------------------------------------------


def _history(model, shape, importance, **kw):
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *shape), importance=importance, pruning_ratio=0.5,
                                  ignored_layers=[model.fc], **kw)
    pruner.step()
    return [(name, out, sorted(int(i) for i in idxs)) for name, out, idxs in pruner.pruning_history()]


@pytest.fixture(scope="module")
def rescaled_pair():
    """A ResNet-18 and a copy computing the same function with other weights: every rescalable hidden
    channel multiplied by 1, 128 or 4096 (powers of two: exact in floating point)."""
    model = _randomized(_seeded(lambda: torchvision.models.resnet18(weights=None, num_classes=10)),
                        dtype=torch.float32)
    rescaled = random_rescale(model, factors=(1, 128, 4096), generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x), model(x), rtol=1e-4, atol=1e-5)
    changed = sum(not torch.equal(a, b) for a, b in zip(model.parameters(), rescaled.parameters()))
    assert changed >= 10
    return model, rescaled


def test_scores_of_every_group_are_invariant_under_rescaling(rescaled_pair, one_thread):
    model, rescaled = rescaled_pair
    shape = (3, 32, 32)
    imp = PathMetricImportance()  # float32 passes: the power-of-two rescaling is exact in any precision
    groups_a = {_root_name(g): g for g in _graph(model, shape, torch.float32).get_all_groups()}
    groups_b = {_root_name(g): g for g in _graph(rescaled, shape, torch.float32).get_all_groups()}
    assert groups_a.keys() == groups_b.keys()
    for name in groups_a:
        torch.testing.assert_close(imp(groups_b[name]), imp(groups_a[name]), rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_metapruner_picks_are_invariant_under_rescaling_while_magnitude_picks_change(rescaled_pair,
                                                                                      global_pruning):
    model, rescaled = rescaled_pair
    shape = (3, 32, 32)
    kw = dict(global_pruning=global_pruning, round_to=8)
    ours = _history(copy.deepcopy(model), shape, PathMetricImportance(), **kw)
    assert ours == _history(copy.deepcopy(rescaled), shape, PathMetricImportance(), **kw)
    magnitude = _history(copy.deepcopy(model), shape, tp.importance.MagnitudeImportance(p=2), **kw)
    assert magnitude != _history(copy.deepcopy(rescaled), shape, tp.importance.MagnitudeImportance(p=2), **kw)


# ----------------------------------------------------------------------------------------------------
# MetaPruner on torchvision models and a U-Net
# ----------------------------------------------------------------------------------------------------

PRUNER_CASES = {
    # id: (builder, input shape, MetaPruner options)
    "resnet18-local-iterative": ("resnet18", 64, dict(iterative_steps=3)),
    "resnet18-global-isomorphic-iterative": ("resnet18", 64, dict(global_pruning=True, isomorphic=True,
                                                                  iterative_steps=3)),
    "resnet50-global-iterative": ("resnet50", 32, dict(global_pruning=True, iterative_steps=3)),
    "vgg16_bn-local-iterative": ("vgg16_bn", 32, dict(iterative_steps=3)),
    "densenet121-global": ("densenet121", 32, dict(global_pruning=True)),
    "unet-local-iterative": ("unet", 64, dict(iterative_steps=3)),
    # raw scores: with sequential ones every group gives up a few channels each step and round_to=8 rounds
    # each cut up to 8 (a 16-channel layer goes 16 -> 8 in one step): 28 % of the conv channels are kept
    "unet-global-iterative": ("unet", 64, dict(global_pruning=True, iterative_steps=3, normalizer=None)),
    # the sequential scores told round_to: channels come off in blocks that leave multiples of 8
    "unet-global-iterative-round-to": ("unet", 64, dict(global_pruning=True, iterative_steps=3, importance_round_to=8)),
}


def _build(name):
    torch.manual_seed(0)
    if name == "unet":
        model = TinyUNet(c=16)
        return model, [model.head]
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return model, [classifier]


@pytest.mark.parametrize("case", list(PRUNER_CASES))
def test_metapruner_prunes_to_half_the_channels_and_the_model_still_runs(case):
    name, size, options = PRUNER_CASES[case]
    model, ignored = _build(name)
    model.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out_shape = model(x).shape
    convs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    options = dict(options)
    importance = PathMetricImportance(normalizer=options.pop("normalizer", "sequential"),
                                      round_to=options.pop("importance_round_to", None))
    pruner = tp.pruner.MetaPruner(model, x, importance=importance, pruning_ratio=0.5, round_to=8,
                                  ignored_layers=ignored, **options)
    for _ in range(options.get("iterative_steps", 1)):
        pruner.step()
    with torch.no_grad():
        y = model(x)
    assert y.shape == out_shape and bool(torch.isfinite(y).all())
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    changed = [n for n in convs if after[n] != convs[n]]
    assert changed, "nothing was pruned"
    assert all(after[n] % 8 == 0 for n in changed), "round_to=8 not honoured"
    assert 0.35 <= sum(after.values()) / sum(convs.values()) <= 0.65
    for m in ignored:  # the output layer keeps its outputs
        assert (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) == out_shape[1]


# ----------------------------------------------------------------------------------------------------
# Global pruning and ignored layers
# ----------------------------------------------------------------------------------------------------


def test_global_pruning_ranks_raw_scores_of_all_groups_together():
    """With global pruning (and no normaliser) MetaPruner removes exactly the channels whose raw relative
    path-metric is below one threshold across all groups; their summed score is far below that of a
    random choice of as many channels, and the pruned network keeps more of its path-norm than one
    pruned globally at random."""
    shape = (3, 32, 32)
    model, ignored = _build("resnet18")
    model = _randomized(model, dtype=torch.float32)
    x = torch.randn(1, *shape)
    n0 = float(path_norm(model, shape))

    ours = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(ours, x, importance=PathMetricImportance(normalizer=None), pruning_ratio=0.5,
                                  global_pruning=True, ignored_layers=[ours.fc])
    imp = PathMetricImportance(normalizer=None)
    scores = {}
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        scores[_root_name(group)] = imp(group)
    removed = {}
    for group in pruner.step(interactive=True):
        removed[_root_name(group)] = sorted(set(int(i) for i in group[0].root_idxs))
        group.prune()
    assert len(removed) >= 5
    flags = torch.cat([torch.isin(torch.arange(len(s)), torch.tensor(removed.get(n, []), dtype=torch.long))
                       for n, s in scores.items()])
    flat = torch.cat(list(scores.values()))
    assert float(flat[flags].max()) <= float(flat[~flags].min())  # one threshold over every group
    k = int(flags.sum())
    g = torch.Generator().manual_seed(0)
    random_sums = [float(flat[torch.randperm(len(flat), generator=g)[:k]].sum()) for _ in range(20)]
    assert float(flat[flags].sum()) < 0.5 * min(random_sums)

    rand = copy.deepcopy(model)
    tp.pruner.MetaPruner(rand, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.5,
                         global_pruning=True, ignored_layers=[rand.fc]).step()
    kept_ours = float(path_norm(ours, shape)) / n0
    kept_random = float(path_norm(rand, shape)) / n0
    assert kept_ours > kept_random


def test_ignored_layers_are_neither_scored_nor_pruned():
    shape = (3, 32, 32)
    model, _ = _build("resnet18")
    ignored = [model.fc, model.layer4, model.layer2[0].conv1]
    keep = {n: m.out_channels for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and (n.startswith("layer4") or n == "layer2.0.conv1")}
    seen = []

    class Recording(PathMetricImportance):
        def __call__(self, group):
            seen.append(_root_name(group))
            return super().__call__(group)

    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *shape), importance=Recording(), pruning_ratio=0.5,
                                  ignored_layers=ignored)
    pruner.step()
    ignored_names = {n for n, m in model.named_modules() if any(m in list(i.modules()) for i in ignored)}
    assert seen and not set(seen) & ignored_names
    modules = dict(model.named_modules())
    for n, width in keep.items():  # (the input channels of layer4.0 follow the pruned layer3 stream)
        assert modules[n].out_channels == width, n
    assert model.layer3[0].conv1.out_channels < 256  # the rest is pruned
    assert model.fc.out_features == 10
    assert model.layer2[0].conv1.out_channels == 128 and model.layer2[0].bn1.num_features == 128


# ----------------------------------------------------------------------------------------------------
# Input shape
# ----------------------------------------------------------------------------------------------------


def test_input_shape_is_read_from_the_dependency_graph():
    model = _randomized(_seeded(TinyResNeXt))
    DG = _graph(model, (3, 8, 8))
    assert input_shape_from_graph(DG) == (3, 8, 8)
    group = next(iter(DG.get_all_groups()))
    assert torch.equal(PathMetricImportance(dtype=F64)(group),
                       PathMetricImportance(input_shape=(3, 8, 8), dtype=F64)(group))
    assert torch.equal(PathMetricImportance(dtype=F64)(group),
                       PathMetricImportance(input_shape=(1, 3, 8, 8), dtype=F64)(group))


def test_a_model_that_does_not_feed_its_input_to_a_layer_asks_for_input_shape():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = F.relu(self.conv(x * 0.5))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))

    model = Scaled().eval()
    DG = _graph(model, (3, 8, 8), torch.float32)
    group = DG.get_pruning_group(model.conv, tp.prune_conv_out_channels, list(range(8)))
    with pytest.raises(ValueError, match="input_shape="):
        PathMetricImportance()(group)
    assert PathMetricImportance(input_shape=(3, 8, 8))(group).shape == (8,)


# ----------------------------------------------------------------------------------------------------
# The structured certificate: the pruned model embedded back into the original architecture
# ----------------------------------------------------------------------------------------------------

from pathsaliency.integrations.torch_pruning import (  # noqa: E402
    ChannelTracker,
    certify_pruned,
    normalized_scores,
    sequential_scores,
)


def _prune_tracked(model, shape, ratio, **kw):
    pruned = copy.deepcopy(model)
    classifier = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(pruned, torch.randn(1, *shape, dtype=F64), importance=PathMetricImportance(dtype=F64),
                                  pruning_ratio=ratio, ignored_layers=[classifier], **kw)
    tracker = ChannelTracker(pruned)
    for _ in range(kw.get("iterative_steps", 1)):
        for group in pruner.step(interactive=True):
            tracker.record(group)
            group.prune()
    return pruned.eval(), tracker


@pytest.mark.parametrize("name", ["resnet18", "densenet"])
def test_embedded_pruned_model_computes_the_pruned_function_and_certifies_it(name, assert_untouched):
    builder, shape, _ = EXACT_MODELS[name]
    model = _randomized(_seeded(builder))
    pruned, tracker = _prune_tracked(model, shape, 0.4, iterative_steps=2)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with assert_untouched(model, pruned):
        embedded = tracker.embedded(model, pruned)
        d = certify_pruned(model, pruned, tracker, shape)
    x = torch.randn(64, *shape, dtype=F64) * 3
    with torch.no_grad():
        y, yp, ye = model(x), pruned(x), embedded(x)
    torch.testing.assert_close(ye, yp, rtol=1e-12, atol=1e-12 * float(yp.abs().max()))
    # the embedding is dominated by the original: D is exact and equals the zeroed copy's distance
    assert d.exact and 0 < d.relative < 1
    assert d.value == pytest.approx(path_metric(model, tracker.zeroed(model), shape, dtype=F64).value, rel=1e-12)
    observed = (y - yp).abs().sum(1)
    bound = x.reshape(len(x), -1).abs().amax(1).clamp_min(1.0) * d.value
    assert bool((observed <= bound).all())


def test_embedding_refuses_a_pruned_model_whose_untracked_layer_changed_shape():
    model = _randomized(_seeded(TinyDenseNet))
    pruned, tracker = _prune_tracked(model, (3, 8, 8), 0.25)
    kept = dict(tracker.kept)
    del kept["stem.0"]
    from pathsaliency.errors import ArchitectureMismatchError
    from pathsaliency.structured import embed_pruned

    with pytest.raises(ArchitectureMismatchError, match="stem.0"):
        embed_pruned(model, pruned, kept)


# ----------------------------------------------------------------------------------------------------
# Global pruning reaches its ratio (the default sequential scores); local pruning is unchanged
# ----------------------------------------------------------------------------------------------------


def _root_channels(pruner):
    return sum(pruner.DG.get_out_channels(g[0].dep.target.module) // pruner._get_channel_groups(g)
               for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                 root_module_types=pruner.root_module_types))


@pytest.fixture(scope="module")
def global_models():
    """ResNet-18, ResNet-50 and DenseNet-121 (torchvision, random weights), built once: tests prune copies."""
    return {name: _build(name)[0].eval() for name in ("resnet18", "resnet50", "densenet121")}


GLOBAL_CASES = {  # id: (torchvision model, exact, iterative steps)
    "resnet18-exact-one-shot": ("resnet18", True, 1),
    "resnet18-first-order-iterative": ("resnet18", False, 3),
    "resnet50-first-order-one-shot": ("resnet50", False, 1),
    "resnet50-first-order-iterative": ("resnet50", False, 2),
    "densenet121-first-order-one-shot": ("densenet121", False, 1),
    "densenet121-first-order-iterative": ("densenet121", False, 2),
}


@pytest.mark.parametrize("case", list(GLOBAL_CASES))
def test_global_pruning_removes_the_requested_ratio(case, global_models):
    name, exact, steps = GLOBAL_CASES[case]
    model = copy.deepcopy(global_models[name])
    ignored = [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]
    x = torch.randn(1, 3, 64, 64)
    pruner = tp.pruner.MetaPruner(model, x, importance=PathMetricImportance((3, 64, 64), exact=exact),
                                  pruning_ratio=0.5, global_pruning=True, iterative_steps=steps,
                                  ignored_layers=ignored)
    total = pruner.initial_total_channels
    for step in range(steps):
        pruner.step()
        target = total * 0.5 * (step + 1) / steps
        removed = total - _root_channels(pruner)
        assert abs(removed - target) <= max(2, 0.005 * total), (step, removed, target, total)
    with torch.no_grad():
        assert bool(torch.isfinite(model(x)).all())


def test_raw_scores_miss_the_global_ratio_because_whole_groups_fall_below_the_threshold(global_models):
    """The defect the sequential scores fix: with raw scores the global threshold lies above every
    channel of ResNet-18's widest groups, and MetaPruner refuses those groups whole."""
    model = copy.deepcopy(global_models["resnet18"])
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 64, 64),
                                  importance=PathMetricImportance((3, 64, 64), exact=False, normalizer=None),
                                  pruning_ratio=0.5, global_pruning=True, ignored_layers=[model.fc])
    total = pruner.initial_total_channels
    pruner.step()
    assert (total - _root_channels(pruner)) / total < 0.3


def test_local_pruning_picks_what_the_raw_scores_pick(rescaled_pair):
    """Sequential scores keep the raw scores' strict order in every group, also in ResNet-18's residual
    streams, where the single-channel scores sum to more than 1 (the formula alone would tie them at 1)."""
    model, _ = rescaled_pair
    shape = (3, 32, 32)
    DG = _graph(model, shape, torch.float32)
    raw = PathMetricImportance(normalizer=None)
    saturated = [g for g in DG.get_all_groups(root_module_types=[nn.Conv2d]) if float(raw(g).sum()) > 1.5]
    assert saturated  # the case that matters is present
    kw = dict(round_to=8)
    assert (_history(copy.deepcopy(model), shape, PathMetricImportance(), **kw)
            == _history(copy.deepcopy(model), shape, PathMetricImportance(normalizer=None), **kw))


def test_sequential_scores_keep_the_group_order_and_are_never_constant():
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 64):
        raw = torch.rand(n, generator=g, dtype=F64) / n
        raw[: n // 3] = 0.0  # dead channels tie at zero
        s = sequential_scores(raw)
        assert bool(torch.isfinite(s).all()) and bool(((s >= 0) & (s <= 1)).all())
        assert float(s.max()) == 1.0 and float(s.max() - s.min()) > 0
        order = torch.sort(raw, stable=True).indices
        assert bool((s[order][1:] >= s[order][:-1]).all())  # a cheaper channel never scores higher
    assert sequential_scores(torch.zeros(3, dtype=F64)).tolist() == [0.0, 0.0, 1.0]
    # a residual stream: the single-channel scores sum to 3, the formula saturates at 1 after a third
    raw = torch.rand(64, generator=g, dtype=F64)
    raw = raw / raw.sum() * 3
    s = sequential_scores(raw)
    order = torch.sort(raw, stable=True).indices
    assert bool((s[order][1:] > s[order][:-1]).all())  # strictly, as the raw scores
    assert bool(((s >= 0) & (s <= 1)).all()) and float(s.max()) == 1.0
    for v in (torch.full((4,), 2.0, dtype=F64), torch.full((3,), 0.25, dtype=F64)):  # equal raw scores
        s = sequential_scores(v)
        assert float(s.max() - s.min()) > 0 and bool(((s >= 0) & (s <= 1)).all())


# ----------------------------------------------------------------------------------------------------
# Normalisers and torch-pruning's GroupNormPruner (which standardises by max - min without a guard)
# ----------------------------------------------------------------------------------------------------


def _gamma(imp):
    """GroupNormPruner.regularize's per-channel factor (torch-pruning 1.6, alpha = 2 ** 4)."""
    imp = imp.sqrt()
    if bool(torch.isnan(imp).any()):
        return None  # GroupNormPruner skips the group
    return 16 ** ((imp.max() - imp) / (imp.max() - imp.min()))


NORMALIZER_NAMES = [None, "sequential", "sum", "mean", "max", "standarization", "gaussian", "lamp", "sentinel_0.5"]


@pytest.mark.parametrize("normalizer", NORMALIZER_NAMES)
def test_no_normaliser_turns_a_constant_or_zero_score_vector_into_nan(normalizer):
    vectors = [torch.zeros(4, dtype=F64), torch.full((3,), 0.25, dtype=F64), torch.tensor([0.0, 0.0, 0.3], dtype=F64),
               torch.rand(7, generator=torch.Generator().manual_seed(0), dtype=F64)]
    for v in vectors:
        s = normalized_scores(v, normalizer)
        assert s.shape == v.shape and bool(torch.isfinite(s).all()), (normalizer, v)
        assert float(s.max() - s.min()) > 0, (normalizer, v)  # never constant: max - min is never 0
        gamma = _gamma(s)
        assert gamma is None or bool(torch.isfinite(gamma).all()), (normalizer, v)
        order = torch.sort(v, stable=True).indices
        assert bool((s[order][1:] >= s[order][:-1]).all())  # monotone: the ranking is the raw one
    one = normalized_scores(torch.tensor([0.4], dtype=F64), normalizer)
    assert one.shape == (1,) and bool(torch.isfinite(one).all())


def test_normalisers_use_torch_prunings_formulas_on_ordinary_vectors():
    v = torch.rand(9, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.1
    magnitude = tp.importance.GroupMagnitudeImportance()
    for name in ["sum", "mean", "max", "standarization", "gaussian", "lamp", "sentinel_0.5"]:
        torch.testing.assert_close(normalized_scores(v, name), magnitude._normalize(v.float(), name),
                                   rtol=1e-6, atol=1e-7, check_dtype=False, msg=name)  # (their lamp: float32 only)
    torch.testing.assert_close(normalized_scores(v, lambda s: s * 2), v * 2, rtol=0, atol=0)
    assert torch.equal(normalized_scores(v, None), v)


def test_bad_normalisers_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown normalizer 'median'.*sequential"):
        PathMetricImportance(normalizer="median")
    with pytest.raises(ValueError, match="finite score per channel"):
        normalized_scores(torch.zeros(3, dtype=F64), lambda s: s / 0)
    assert PathMetricImportance(sequential=False).normalizer is None
    assert PathMetricImportance(sequential=True).normalizer == "sequential"


def _regularised_grads(model, x, importance, steps=2):
    pruner = tp.pruner.GroupNormPruner(model, x, importance=importance, global_pruning=True, iterative_steps=steps,
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    grads = []
    for _ in range(steps):
        model.zero_grad()
        model(x).sum().backward()
        pruner.update_regularizer()
        pruner.regularize(model)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        for group in pruner.step(interactive=True):
            group.prune()
    return grads


def _dead_layer_densenet():
    """TinyDenseNet whose last dense layer carries no path: its 4 channels (12..15 of the final
    batch-norm) all score 0, a constant vector for the raw scores."""
    m = _randomized(_seeded(TinyDenseNet), dtype=torch.float32)
    with torch.no_grad():
        m.block2[1].conv.weight.zero_()
        m.norm.bias[12:].zero_()  # no shift there either, so no path starts at them
        m.norm.running_mean[12:].zero_()
    return m


@pytest.mark.parametrize("normalizer", NORMALIZER_NAMES)
def test_group_norm_pruner_regularisation_stays_finite(normalizer):
    """GroupNormPruner.regularize computes ``alpha ** ((max - s) / (max - min))`` of ``s = imp.sqrt()``
    (skipping only a group whose scores hold a NaN): a constant score vector gives 0/0 = NaN gradients.
    The dead layer's raw scores are constant (all 0): its regularisation stays finite with every
    normaliser; and three regularise/prune iterations of the DenseNet-style model stay finite."""
    x = torch.randn(2, 3, 8, 8)
    imp = PathMetricImportance((3, 8, 8), normalizer=normalizer)
    first = _regularised_grads(_dead_layer_densenet(), x, imp, 1)[0]
    assert all(bool(torch.isfinite(g).all()) for g in first), normalizer
    model = _randomized(_seeded(TinyDenseNet), dtype=torch.float32)
    for step, grads in enumerate(_regularised_grads(model, x, imp, 3)):
        assert all(bool(torch.isfinite(g).all()) for g in grads), (normalizer, step)


def test_one_channel_layers_make_group_norm_pruner_nan_with_torch_prunings_own_importance():
    """The one case no importance can help: a one-entry score vector has max - min = 0. Ours returns a
    finite score there, as GroupMagnitudeImportance does, and the pruner's formula gives NaN for both
    (a layer left with one channel: with the sequential scores, global pruning leaves one of a layer
    whose other channels carry no path, as the dead layer above)."""
    model = _seeded(lambda: nn.Sequential(nn.Conv2d(3, 1, 3), nn.ReLU(), nn.Conv2d(1, 4, 3), nn.ReLU(),
                                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2)))
    DG = _graph(model, (3, 8, 8), torch.float32)
    group = DG.get_pruning_group(model[0], tp.prune_conv_out_channels, [0])
    ours = PathMetricImportance((3, 8, 8))(group)
    theirs = tp.importance.GroupMagnitudeImportance()(group)
    assert ours.shape == theirs.shape == (1,) and bool(torch.isfinite(ours).all())
    assert bool(torch.isnan(_gamma(ours)).all()) and bool(torch.isnan(_gamma(theirs)).all())


# ----------------------------------------------------------------------------------------------------
# Groups coupled through an unflatten (torch-pruning's tests/test_reshape.py model)
# ----------------------------------------------------------------------------------------------------


class Unflatten(nn.Module):
    """Linear 4096 -> view(n, 256, 4, 4) -> ConvTranspose: root feature c of the linear layer shares input
    channel c // 16 of the transposed conv with 15 other features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4096)
        self.up = nn.ConvTranspose2d(256, 4, 4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return self.up(y.view(y.shape[0], -1, 4, 4))


def test_unflatten_groups_score_what_physical_pruning_removes():
    model = _randomized(_seeded(Unflatten))
    shape = (8,)
    DG = _graph(model, shape)
    n0 = float(path_norm(model, shape, dtype=F64))
    imp = PathMetricImportance(input_shape=shape, dtype=F64, normalizer=None)
    rng = random.Random(0)
    for group in DG.get_all_groups():
        scores = imp(group)
        n = len(scores)
        picks = sorted({0, n - 1} | set(rng.sample(range(n), min(6, n))))
        for j in picks:
            pruned = _physically_pruned(model, shape, _root_name(group), group[0].dep.handler, [j])
            lost = n0 - float(path_norm(pruned, shape, dtype=F64))
            _assert_score_is_loss(float(scores[j]), n0, lost, f"group {_root_name(group)}, channel {j}")
        if n == 4096:  # the 16 features of one transposed-conv channel go together: one score
            assert torch.equal(scores.view(256, 16), scores.view(256, 16)[:, :1].expand(256, 16))


# ----------------------------------------------------------------------------------------------------
# Removal passes skip the input channels a removal already takes away whole
# ----------------------------------------------------------------------------------------------------


def test_stream_groups_do_not_remove_the_next_stages_input_channels_again(monkeypatch):
    """A residual stream's group also cuts the next stage's input channels, which read a channel the
    removal has already zeroed: the pass drops those input masks (and so stops at the stage's end), with
    the scores of the pass that keeps them."""
    import pathsaliency.saliency as saliency

    model = _randomized(_seeded(EXACT_MODELS["resnet18"][0]))
    shape = (3, 16, 16)
    DG = _graph(model, shape)
    groups = [g for g in DG.get_all_groups(ignored_layers=[model.fc])
              if len({r.module for r in group_removals(g) if r.side == "out"}) > 2]  # the residual streams
    dropped = []
    real = saliency._without_lost_inputs

    def spy(plan, prof, masks, in_masks):
        out = real(plan, prof, masks, in_masks)
        dropped.append(len(in_masks) - len(out))
        return out

    monkeypatch.setattr(saliency, "_without_lost_inputs", spy)
    shortcut = [PathMetricImportance(shape, dtype=F64, normalizer=None)(g) for g in groups]
    assert len(groups) == 4 and all(k > 0 for k in dropped)
    monkeypatch.setattr(saliency, "_without_lost_inputs", lambda plan, prof, masks, in_masks: in_masks)
    model = copy.deepcopy(model)  # a fresh cache
    full = [PathMetricImportance(shape, dtype=F64, normalizer=None)(g)
            for g in _graph(model, shape).get_all_groups(ignored_layers=[model.fc])
            if len({r.module for r in group_removals(g) if r.side == "out"}) > 2]
    for a, b in zip(shortcut, full):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


class _HalfLostSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.c(F.relu(self.a(x) + self.b(x)))


def test_an_input_channel_that_another_addend_still_feeds_is_removed(assert_untouched):
    """Channel 1 of ``a`` removed with ``c``'s input channel 1: ``b`` still feeds that channel of the sum,
    so the input removal is not redundant and is kept; the score is the zeroed copy's path-metric."""
    import pathsaliency as ps

    model = _randomized(_seeded(_HalfLostSum))
    shape = (2, 5, 5)
    removals = [ps.Removal("a", "out", torch.tensor([1, 2]), torch.tensor([0, 1])),
                ps.Removal("c", "in", torch.tensor([1, 2]), torch.tensor([0, 1]))]
    with assert_untouched(model):
        scores = ps.channel_saliency(model, shape, removals, 2, dtype=F64)
    for j in range(2):
        d = path_metric(model, _zeroed(model, removals, j), shape, dtype=F64)
        assert d.relative == pytest.approx(float(scores[j]), rel=1e-9, abs=1e-15)
    kept_only_a = ps.channel_saliency(model, shape, removals[:1], 2, dtype=F64)
    assert bool((scores > kept_only_a * (1 + 1e-9)).all())  # the input removal counts


@pytest.mark.parametrize("progress, shown", [(True, True), (None, False), (False, False)])
def test_an_exact_metapruner_step_shows_a_progress_bar_over_its_removal_passes(progress, shown, capsys):
    """The long part of an exact step (the residual streams' removal passes) runs under a tqdm bar when
    asked, by default only on a terminal (pytest's stderr is none); groups without removal passes show
    none."""
    pytest.importorskip("tqdm")
    model = _randomized(_seeded(EXACT_MODELS["resnet18"][0]), dtype=torch.float32)
    shape = (3, 16, 16)
    imp = PathMetricImportance(shape, progress=progress)
    DG = _graph(model, shape, torch.float32)
    cheap = next(g for g in DG.get_all_groups(ignored_layers=[model.fc])
                 if len({r.module for r in group_removals(g) if r.side == "out"}) <= 2)
    imp(cheap)
    assert capsys.readouterr().err == ""
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *shape), importance=imp, pruning_ratio=0.3,
                                  ignored_layers=[model.fc])
    pruner.step()
    err = capsys.readouterr().err
    assert ("path-metric" in err and "ch/s" in err) == shown, err


# ----------------------------------------------------------------------------------------------------
# MetaPruner's round_to under global pruning
# ----------------------------------------------------------------------------------------------------


def _unet_widths(importance, round_to):
    torch.manual_seed(0)
    model = TinyUNet(c=16).eval()
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=importance, pruning_ratio=0.5,
                                  round_to=round_to, global_pruning=True, ignored_layers=[model.head])
    pruner.step()
    return [m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "head"]


def test_round_to_rounds_every_groups_remaining_channels_down_after_the_global_threshold():
    """The U-Net that keeps 28 %: torch-pruning applies the global threshold, then rounds each group's
    remaining channels *down* to a multiple of round_to (``_round_to``), so every group loses up to 7
    more. The sequential scores leave every group about the same count (11-15 of 16-64 here), all just
    under 16: each drops to 8. Told round_to, the scores cut whole blocks and the ratio holds."""
    total = 16 + 16 + 32 + 64 + 32 + 16
    free = _unet_widths(PathMetricImportance((3, 32, 32)), None)
    rounded = _unet_widths(PathMetricImportance((3, 32, 32)), 8)
    assert rounded == [max(8, w - w % 8) for w in free]  # the same threshold, each count rounded down
    assert abs(sum(free) / total - 0.5) <= 0.05 and sum(rounded) / total < 0.35
    told = _unet_widths(PathMetricImportance((3, 32, 32), round_to=8), 8)
    assert all(w % 8 == 0 for w in told) and 0.4 <= sum(told) / total <= 0.5


def test_sequential_scores_in_blocks_of_round_to_keep_the_order_and_leave_multiples():
    """Blocks of the sorted channels: the cheapest ``n mod k`` (``k`` when ``k`` divides ``n``), then ``k`` at
    a time, so a cut between blocks leaves a multiple of ``k``; inside a block one score (up to the
    ``2**-40`` steps of the strict order), and the block's score is what it removes of what is left."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((20, 8), (16, 8), (7, 3), (5, 8), (64, 4)):
        raw = torch.rand(n, generator=g, dtype=F64) / n
        s = sequential_scores(raw, k)
        order = torch.sort(raw, stable=True).indices
        v, r = s[order], raw[order]
        assert bool((v[1:] > v[:-1]).all())  # the raw strict order, never constant
        cuts = [0] + list(range(n % k or k, n + 1, k))
        assert all((n - c) % k == 0 for c in cuts[1:])
        for a, b in zip(cuts, cuts[1:]):
            block = v[a:b]
            assert float(block.max() / block.min()) <= 1 + 2.0 ** -38 * k  # one score
            if b == n:  # the top block scores 1 (torch-pruning never empties a layer)
                assert float(block.min()) >= 1 - 2.0 ** -38 * k
            else:
                removed = float(r[a:b].sum() / (1 - r[:a].sum()))
                assert float(block.max()) == pytest.approx(removed, rel=1e-12)
            if a:
                assert float(block.min()) > float(v[a - 1]) * (1 + 2.0 ** -30)  # blocks stand apart
    raw = torch.rand(9, generator=g, dtype=F64)
    assert torch.equal(sequential_scores(raw, 1), sequential_scores(raw))
    with pytest.raises(ValueError, match="round_to"):
        PathMetricImportance(round_to=0)
