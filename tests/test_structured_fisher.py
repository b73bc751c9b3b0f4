"""``GroupFisherImportance`` (data-aware, rescaling-invariant group score of the torch-pruning adapter):

* by hand: on a conv-bn-relu-conv-bn net and on a residual stream of the CIFAR ResNet-20 (conv-shortcut
  form: every block's ``bn2`` and the frozen shortcut add into it), each sample's ``z`` is the derivative
  of its loss with respect to a gate multiplying the channel at all its producers (explicit gates
  inserted with forward hooks), and the score is the mean of ``z^2``;
* bit-identical scores and ``MetaPruner`` picks (local, global) after a power-of-two ``random_rescale``;
* the user's model untouched; the cached derivatives follow weight changes and pruning steps.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

tp = pytest.importorskip("torch_pruning")

from pathsaliency import random_rescale  # noqa: E402
from pathsaliency.integrations.torch_pruning import FrozenFollowingPruner, GroupFisherImportance  # noqa: E402
from pathsaliency.models.cifar_resnet import ShortcutConv, resnet20, to_conv_shortcut  # noqa: E402

SHAPE = (3, 32, 32)
FACTORS = (2.0 ** -5, 1, 128, 4096)


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _batches(seed=2, n=2, size=8, shape=SHAPE, classes=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def _frozen(model):
    return [m.conv for m in model.modules() if isinstance(m, ShortcutConv)]


@pytest.fixture(scope="module")
def resnet_pair():
    torch.manual_seed(0)
    model = _randomize_bn(to_conv_shortcut(resnet20()))
    return model, random_rescale(model, factors=FACTORS, generator=torch.Generator().manual_seed(1))


def _groups(model):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *SHAPE))
    return list(DG.get_all_groups(ignored_layers=[model.linear]))


def _gated_derivatives(model, modules, channels, batches, loss):
    """``(samples, len(channels))``: d loss_n / d g_c with the outputs of ``modules`` multiplied by a
    per-sample gate ``g[n, c]`` (= 1) on channel ``c`` of each: the explicit definition of ``z``."""
    out = []
    for x, y in batches:
        gate = torch.ones(x.shape[0], len(channels), dtype=torch.float64, requires_grad=True)

        def hook(m, args, o):
            scale = torch.ones(o.shape[0], o.shape[1], dtype=torch.float64)
            scale = scale.index_put((torch.arange(o.shape[0])[:, None], torch.tensor(channels)[None]), gate)
            return o * scale.to(o.dtype).view(*scale.shape, *([1] * (o.dim() - 2)))

        hooks = [m.register_forward_hook(hook) for m in modules]
        try:
            loss(model.eval()(x), y).backward()
        finally:
            for h in hooks:
                h.remove()
        out.append(gate.grad)
    return torch.cat(out)


def test_scores_of_a_tiny_net_by_hand(assert_untouched):
    torch.manual_seed(0)
    m = _randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                                    nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))

    def loss(out, y):  # any loss summed over the samples
        return (out.pow(2).sum((1, 2, 3)) * (1 + y)).sum()

    batches = _batches(shape=(2, 7, 7), classes=3)
    DG = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 2, 7, 7))
    group = DG.get_pruning_group(m[0], tp.prune_conv_out_channels, [0, 1, 2])
    imp = GroupFisherImportance(batches, loss=loss, normalizer=None)
    with assert_untouched(m):
        got = imp(group)
    z = _gated_derivatives(m, [m[1]], [0, 1, 2], batches, loss)  # the gate after the batch-norm
    torch.testing.assert_close(got, z.pow(2).mean(0).float(), rtol=1e-5, atol=0)
    mean = GroupFisherImportance(batches, loss=loss)(group)  # torch-pruning's default normaliser
    torch.testing.assert_close(mean, got / got.mean(), rtol=1e-6, atol=0)


def test_a_residual_stream_sums_every_producer_including_the_frozen_shortcut(resnet_pair, assert_untouched):
    """Stage 2's stream of ResNet-20: channel ``c`` is produced by ``bn2`` of its three blocks and by the
    frozen shortcut of its first block; the group as the recipe's pruner scores it (``scoring_frozen=True``)
    sums their gates."""
    model = copy.deepcopy(resnet_pair[0])
    batches = _batches()
    stage = model.layer2
    group = next(g for g in _groups(model) if any(d.target.module is stage[1].bn2 for d, _ in g))
    assert any(d.target.module is stage[0].shortcut.conv for d, _ in group)
    imp = GroupFisherImportance(batches, normalizer=None)
    with assert_untouched(model):
        got = imp(group)
    channels = list(range(32))
    loss = GroupFisherImportance(batches).loss
    z = _gated_derivatives(model, [b.bn2 for b in stage] + [stage[0].shortcut.conv], channels, batches, loss)
    order = torch.tensor([int(i) for i in group[0].idxs])  # scores come in the root's channel order
    torch.testing.assert_close(got, z.pow(2).mean(0).float()[order], rtol=1e-4, atol=0)


def test_scores_are_bit_identical_under_rescaling(resnet_pair, one_thread):
    model, rescaled = resnet_pair
    batches = _batches()
    a, b = GroupFisherImportance(batches), GroupFisherImportance(batches)
    sa = [a(g) for g in _groups(model)]
    assert len(sa) == 12 and all(s is not None and torch.isfinite(s).all() for s in sa)
    assert all(torch.equal(x, y) for x, y in zip(sa, [b(g) for g in _groups(rescaled)]))


def _history(model, global_pruning, steps=1):
    pruner = FrozenFollowingPruner(model, torch.randn(1, *SHAPE), GroupFisherImportance(_batches()),
                                   frozen_layers=_frozen(model), ignored_layers=[model.linear], scoring_frozen=True,
                                   pruning_ratio=0.5, global_pruning=global_pruning, iterative_steps=steps)
    for _ in range(steps):
        pruner.step()
    with torch.no_grad():
        assert model(torch.randn(2, *SHAPE)).shape == (2, 10)
    return [(n, out, sorted(int(i) for i in idxs)) for n, out, idxs in pruner.pruning_history()]


@pytest.mark.parametrize("global_pruning, steps", [(False, 1), (True, 1), (True, 2)])
def test_metapruner_picks_are_invariant_under_rescaling(resnet_pair, one_thread, global_pruning, steps):
    model, rescaled = resnet_pair
    ours = _history(copy.deepcopy(model), global_pruning, steps)
    assert len(ours) >= steps and ours == _history(copy.deepcopy(rescaled), global_pruning, steps)


def test_cached_derivatives_follow_weight_changes_and_pruning(resnet_pair):
    model = copy.deepcopy(resnet_pair[0])
    batches = _batches()
    imp = GroupFisherImportance(batches)
    group = next(g for g in _groups(model) if g[0].dep.target.module is model.layer1[0].conv1)
    before = imp(group)
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] *= 0.0  # channel 3 switched off: it no longer changes the loss
    after = imp(group)
    assert float(after[3]) == 0.0 < float(before[3])
    fresh = copy.deepcopy(model)
    fresh_group = next(g for g in _groups(fresh) if g[0].dep.target.module is fresh.layer1[0].conv1)
    assert torch.equal(after, GroupFisherImportance(batches)(fresh_group))
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *SHAPE), importance=imp, pruning_ratio=0.5,
                                  iterative_steps=2, ignored_layers=[model.linear] + _frozen(model))
    pruner.step()
    fresh = copy.deepcopy(model)
    DG = tp.DependencyGraph().build_dependency(fresh, example_inputs=torch.randn(1, *SHAPE))
    fresh_groups = list(DG.get_all_groups(ignored_layers=[fresh.linear] + _frozen(fresh)))
    ours = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers))
    assert len(ours) == len(fresh_groups) > 0
    for g, h in zip(ours, fresh_groups):
        assert torch.equal(imp(g), GroupFisherImportance(batches)(h))


def test_torchvision_resnet18_with_in_place_relu(one_thread):
    """torchvision's ResNet-18 feeds every batch-norm output to an in-place ReLU: the gate derivative read
    there is the same (``relu(a) dL/drelu(a) = a dL/da``), checked against an explicit gate, and the
    scores are bit-identical after a power-of-two ``random_rescale``."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    rescaled = random_rescale(model, factors=FACTORS, generator=torch.Generator().manual_seed(1))
    batches = _batches(n=1, size=4)

    def groups(m):
        DG = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, *SHAPE))
        return list(DG.get_all_groups(ignored_layers=[m.fc]))

    ga = groups(model)
    sa = [GroupFisherImportance(batches)(g) for g in ga]
    assert all(torch.equal(a, b) for a, b in zip(sa, [GroupFisherImportance(batches)(g) for g in groups(rescaled)]))
    group = next(g for g in ga if g[0].dep.target.module is model.layer1[0].conv1)
    got = GroupFisherImportance(batches, normalizer=None)(group)
    z = _gated_derivatives(model, [model.layer1[0].bn1], list(range(64)), batches, GroupFisherImportance(batches).loss)
    order = torch.tensor([int(i) for i in group[0].idxs])
    torch.testing.assert_close(got, z.pow(2).mean(0).float()[order], rtol=1e-4, atol=0)
