"""The norm-balanced representative (``pathsaliency.criteria.norm_balanced_parameters``) and
``NormBalancedImportance`` (torch-pruning's group magnitude importance read on it):

* the representative computes the same function, every rescalable channel has ``|gamma_j| = ||W_:j||``,
  and it equals a hand computation on a conv-bn-relu-conv-bn net (as does the importance's score);
* it is bit-identical after a power-of-two ``random_rescale`` and so are the scores and ``MetaPruner``'s
  picks (local, global, one-shot and iterative), while torch-pruning's plain L2 changes;
* the user's model is never written; the cached representative follows in-place weight changes and
  pruning steps; a model without batch-norm is refused.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

tp = pytest.importorskip("torch_pruning")

from pathsaliency import random_rescale  # noqa: E402
from pathsaliency.criteria import norm_balanced_parameters  # noqa: E402
from pathsaliency.integrations.torch_pruning import NormBalancedImportance  # noqa: E402
from pathsaliency.models.cifar_resnet import resnet20, to_conv_shortcut  # noqa: E402

SHAPE = (3, 32, 32)
FACTORS = (2.0 ** -5, 1, 128, 4096)


def _randomize_bn(model, seed=0):
    """Random batch-norm statistics and affine parameters (signs of gamma included), eval mode."""
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


def _tiny():
    torch.manual_seed(0)
    return _randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                                       nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))


@pytest.fixture(scope="module")
def resnet_pair():
    """A random-weight ResNet-20 (conv-shortcut form, as the recipe prunes it) and a rescaled copy."""
    torch.manual_seed(0)
    model = _randomize_bn(to_conv_shortcut(resnet20()))
    rescaled = random_rescale(model, factors=FACTORS, generator=torch.Generator().manual_seed(1))
    assert sum(not torch.equal(a, b) for a, b in zip(model.parameters(), rescaled.parameters())) >= 18
    return model, rescaled


def _groups(model):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *SHAPE))
    return list(DG.get_all_groups(ignored_layers=[model.linear]))


def _loaded(model, params):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(params[n])
    return out


def test_representative_of_a_tiny_net_by_hand(assert_untouched):
    m = _tiny()
    with assert_untouched(m):
        rep = norm_balanced_parameters(m)
    gamma, w2 = m[1].weight.detach(), m[3].weight.detach()
    lam = (w2.pow(2).sum((0, 2, 3)).sqrt() / gamma.abs()).sqrt()  # channel j: sqrt(||W_:j|| / |gamma_j|)
    torch.testing.assert_close(rep["3.weight"], w2 / lam.view(1, -1, 1, 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rep["1.weight"], gamma * lam, rtol=1e-6, atol=0)
    torch.testing.assert_close(rep["1.bias"], m[1].bias.detach() * lam, rtol=1e-6, atol=0)
    for n in ("0.weight", "4.weight", "4.bias"):  # the first conv's rows and the output batch-norm: as trained
        assert torch.equal(rep[n], dict(m.named_parameters())[n])
    # balanced: as much weight going in as going out, and the same function
    torch.testing.assert_close(rep["1.weight"].abs(), rep["3.weight"].pow(2).sum((0, 2, 3)).sqrt(), rtol=1e-6, atol=0)
    x = torch.randn(5, 2, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(_loaded(m, rep)(x), m(x), rtol=1e-5, atol=1e-6)


def test_importance_of_a_tiny_net_by_hand():
    """Group of the first conv (its rows, its batch-norm, the second conv's columns), l2, mean, mean:
    ``(||row_j||^2 + gamma_j'^2 + ||col_j'||^2) / 3`` over its mean, with ``gamma_j'^2 = ||col_j'||^2 =
    |gamma_j| ||W_:j||``."""
    m = _tiny()
    DG = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 2, 7, 7))
    group = DG.get_pruning_group(m[0], tp.prune_conv_out_channels, [0, 1, 2])
    rows = m[0].weight.detach().pow(2).sum((1, 2, 3))
    product = m[1].weight.detach().abs() * m[3].weight.detach().pow(2).sum((0, 2, 3)).sqrt()
    expected = (rows + 2 * product) / 3
    torch.testing.assert_close(NormBalancedImportance()(group), expected / expected.mean(), rtol=1e-5, atol=0)
    plain = tp.importance.MagnitudeImportance(p=2)(group)  # differs: gamma and columns as trained
    assert not torch.allclose(plain, expected / expected.mean(), rtol=1e-3)


def test_representative_and_scores_are_bit_identical_under_rescaling(resnet_pair, assert_untouched):
    model, rescaled = resnet_pair
    with assert_untouched(model):
        a = norm_balanced_parameters(model)
    b = norm_balanced_parameters(rescaled)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert sum(not torch.equal(a[n], p) for n, p in model.named_parameters()) >= 18  # not the model itself
    ga, gb = _groups(model), _groups(rescaled)
    assert len(ga) == len(gb) == 12
    for kw in (dict(p=1), dict(p=2), dict(p=2, group_reduction="max")):  # the recipe's three forms
        imp_a, imp_b = NormBalancedImportance(**kw), NormBalancedImportance(**kw)
        with assert_untouched(model):
            sa = [imp_a(g) for g in ga]
        assert all(torch.equal(x, y) for x, y in zip(sa, [imp_b(g) for g in gb])), kw
        plain = tp.importance.MagnitudeImportance(**kw)
        assert not all(torch.equal(plain(x), plain(y)) for x, y in zip(ga, gb)), kw  # the test can fail


def _history(model, global_pruning, steps):
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *SHAPE), importance=NormBalancedImportance(),
                                  pruning_ratio=0.5, global_pruning=global_pruning, iterative_steps=steps,
                                  ignored_layers=[model.linear])
    for _ in range(steps):
        pruner.step()
    with torch.no_grad():
        assert model(torch.randn(2, *SHAPE)).shape == (2, 10)
    return [(n, out, sorted(int(i) for i in idxs)) for n, out, idxs in pruner.pruning_history()]


@pytest.mark.parametrize("global_pruning, steps", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_metapruner_picks_are_invariant_under_rescaling(resnet_pair, global_pruning, steps):
    model, rescaled = resnet_pair
    ours = _history(copy.deepcopy(model), global_pruning, steps)
    assert len(ours) >= steps and ours == _history(copy.deepcopy(rescaled), global_pruning, steps)


def test_cached_representative_follows_weight_changes_and_pruning(resnet_pair):
    model = copy.deepcopy(resnet_pair[0])
    imp = NormBalancedImportance()
    group = next(g for g in _groups(model) if g[0].dep.target.module is model.layer1[0].conv1)
    before = imp(group)
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] *= 64.0  # channel 3: more weight going in
    after = imp(group)
    fresh = copy.deepcopy(model)
    fresh_group = next(g for g in _groups(fresh) if g[0].dep.target.module is fresh.layer1[0].conv1)
    assert torch.equal(after, NormBalancedImportance()(fresh_group))
    assert float(after[3]) > float(before[3])
    # after a pruning step the same importance object scores the reshaped model as a fresh one does
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *SHAPE), importance=imp, pruning_ratio=0.5,
                                  iterative_steps=2, ignored_layers=[model.linear])
    pruner.step()
    fresh = copy.deepcopy(model)
    for g, h in zip(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers), _groups(fresh)):
        assert torch.equal(imp(g), NormBalancedImportance()(h))


def test_a_model_without_batchnorm_is_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match="batch-norm with affine parameters.*'0'"):
        norm_balanced_parameters(m)
    DG = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 8, 8))
    group = DG.get_pruning_group(m[0], tp.prune_conv_out_channels, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="batch-norm"):
        NormBalancedImportance()(group)


# ---------------------------------------------------------------------------------------------------
# torch-pruning's TaylorImportance is itself rescaling-invariant (a data-aware invariant row that exists)


def _frozen(model):
    from pathsaliency.models.cifar_resnet import ShortcutConv
    return [m.conv for m in model.modules() if isinstance(m, ShortcutConv)]


def _taylor_gradients(model, seed=2):
    """``loss.backward()`` of one fixed random batch, eval mode (batch-norm statistics untouched)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, *SHAPE, generator=g), torch.randint(0, 10, (16,), generator=g)
    model.eval().zero_grad(set_to_none=True)
    nn.CrossEntropyLoss()(model(x), y).backward()
    return model


@pytest.mark.parametrize("kw", [dict(), dict(multivariable=True), dict(bias=True), dict(group_reduction="max")])
def test_taylor_importance_is_bit_identical_under_rescaling(resnet_pair, one_thread, kw):
    """Each ``theta * dL/dtheta`` is unchanged by a rescaling of a hidden channel: ``gamma_j``, ``beta_j``
    times ``mu`` and their gradients divided by it, the consumer's column divided by ``mu`` and its
    gradient multiplied by it, the producer's row (gauged by its batch-norm) and its gradient unchanged.
    With powers of two every product is exact: torch-pruning's Taylor scores of every group are
    bit-identical (the frozen shortcut convolutions, which have no gradient, left out as the recipe's
    ``FrozenFollowingPruner`` does), while its L2 scores change."""
    from pathsaliency.integrations.torch_pruning._compat import group_with_items
    model, rescaled = (_taylor_gradients(copy.deepcopy(m)) for m in resnet_pair)

    def groups(m):
        frozen = set(_frozen(m))
        return [group_with_items(g, lambda it: it.dep.target.module not in frozen) for g in _groups(m)]

    ga, gb = groups(model), groups(rescaled)
    taylor = tp.importance.TaylorImportance(**kw)
    assert all(torch.equal(taylor(a), taylor(b)) for a, b in zip(ga, gb))
    plain = tp.importance.MagnitudeImportance(p=2)
    assert not any(torch.equal(plain(a), plain(b)) for a, b in zip(ga, gb))


@pytest.mark.parametrize("global_pruning", [False, True])
def test_taylor_metapruner_picks_are_invariant_under_rescaling(resnet_pair, one_thread, global_pruning):
    from pathsaliency.integrations.torch_pruning import FrozenFollowingPruner

    def history(model):
        _taylor_gradients(model)
        pruner = FrozenFollowingPruner(model, torch.randn(1, *SHAPE), tp.importance.TaylorImportance(),
                                       frozen_layers=_frozen(model), ignored_layers=[model.linear],
                                       pruning_ratio=0.5, global_pruning=global_pruning)
        pruner.step()
        return [(n, out, sorted(int(i) for i in idxs)) for n, out, idxs in pruner.pruning_history()]

    ours = history(copy.deepcopy(resnet_pair[0]))
    assert len(ours) >= 1 and ours == history(copy.deepcopy(resnet_pair[1]))
