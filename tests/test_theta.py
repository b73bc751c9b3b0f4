"""``Theta``: theta of MATH.md section 1 as an object. Built from a module, from its state dict, or from
already-folded per-layer values, it is the same parameter vector: bit-identical path metrics. A layer
given folded equals the module with that layer changed, folded independently (torch's own fusion)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

import pathsaliency as ps
from pathsaliency import ArchitectureMismatchError, PathSaliencyError, Theta

SHAPE = (3, 8, 8)


class Net(nn.Module):
    """conv+bn (folded), conv with bias, a standalone batch-norm after a skip, linear+bn1d (folded)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_skip = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn_skip(x + self.conv2(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.head(torch.relu(self.bn_fc(self.fc(x))))


def _net(seed=0):
    torch.manual_seed(seed)
    m = Net().double().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn_skip, m.bn_fc):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


def _perturbed(m, seed=1):
    torch.manual_seed(seed)
    out = copy.deepcopy(m)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return out


def test_theta_from_module_state_dict_and_folded_give_bit_identical_metrics(assert_untouched):
    m, other = _net(), _perturbed(_net())
    with assert_untouched(m, other):
        thetas = [Theta.from_module(m), Theta.from_state_dict(m, m.state_dict()),
                  Theta.from_folded(m, Theta.from_module(m).layers)]
        others = [other, other.state_dict(), Theta.from_module(other), Theta.from_state_dict(m, other.state_dict()),
                  Theta.from_folded(m, Theta.from_module(other).layers)]
        want = ps.path_metric(m, other, SHAPE)
        assert not want.exact and want.log2 > -math.inf
        for first in [m] + thetas:
            for second in others:
                got = ps.path_metric(first, second, SHAPE)
                assert (got.log2, got.exact, got.log2_norm) == (want.log2, want.exact, want.log2_norm)
        x = torch.randn(4, *SHAPE, dtype=torch.float64)
        assert torch.equal(ps.lipschitz_bound(thetas[1], others[4], x), ps.lipschitz_bound(m, other, x))
        per_layer = ps.layer_distances(m, other, SHAPE)
        for second in others[2:]:
            got = ps.layer_distances(m, second, SHAPE)
            assert {k: v.log2 for k, v in got.items()} == {k: v.log2 for k, v in per_layer.items()}


def test_step_names_are_the_affine_layers():
    assert Theta.from_module(_net()).step_names() == ["conv1", "conv2", "bn_skip", "fc", "head"]


@pytest.mark.parametrize("layer", ["conv1", "conv2", "bn_skip", "fc"])
def test_from_folded_with_one_changed_layer_equals_the_module_with_that_layer_changed(layer, assert_untouched):
    m = _net()
    changed = copy.deepcopy(m)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in changed.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if owner == layer:
                p.mul_(1 + 0.2 * torch.rand_like(p))
                p.add_(0.01 * torch.randn_like(p))
    mod = dict(changed.named_modules())[layer]
    if layer == "conv1":  # torch's own conv-bn fusion: an independent folding
        w, b = fuse_conv_bn_weights(mod.weight, None, changed.bn1.running_mean, changed.bn1.running_var,
                                    changed.bn1.eps, changed.bn1.weight, changed.bn1.bias)
    elif layer == "fc":
        w, b = fuse_linear_bn_weights(mod.weight, mod.bias, changed.bn_fc.running_mean, changed.bn_fc.running_var,
                                      changed.bn_fc.eps, changed.bn_fc.weight, changed.bn_fc.bias)
    elif layer == "bn_skip":
        s = mod.weight / torch.sqrt(mod.running_var + mod.eps)
        w, b = s, mod.bias - mod.running_mean * s
    else:
        w, b = mod.weight, mod.bias
    with assert_untouched(m, changed):
        theta = Theta.from_folded(m, {layer: (w.detach(), b.detach())})
        want = ps.path_metric(m, changed, SHAPE)
        got = ps.path_metric(m, theta, SHAPE)
    assert want.log2 > -math.inf
    assert abs(got.value - want.value) <= 1e-12 * want.value
    assert abs(got.log2_norm - want.log2_norm) <= 1e-12
    assert got.exact == want.exact
    for name, (w0, b0) in Theta.from_module(m).layers.items():  # the other layers are the reference's
        if name != layer:
            assert torch.equal(theta.layers[name][0], w0)


def test_from_folded_keeps_a_missing_bias_as_zero():
    m = _net()
    w, _ = Theta.from_module(m).layers["conv2"]
    with torch.no_grad():
        plain = copy.deepcopy(m)
        plain.conv2.bias.zero_()
    assert ps.path_metric(m, Theta.from_folded(m, {"conv2": (w, None)}), SHAPE).log2 == \
        ps.path_metric(m, plain, SHAPE).log2


def test_shape_mismatch_errors_name_the_layer():
    m = _net()
    w, b = Theta.from_module(m).layers["conv2"]
    with pytest.raises(ArchitectureMismatchError, match="layer 'conv2'.*W has shape"):
        Theta.from_folded(m, {"conv2": (w[:3], b)})
    with pytest.raises(ArchitectureMismatchError, match="layer 'conv2'.*b has shape"):
        Theta.from_folded(m, {"conv2": (w, b[:3])})
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU())
    with pytest.raises(ArchitectureMismatchError, match="layer '0' has no bias"):
        Theta.from_folded(plain, {"0": (plain[0].weight, torch.zeros(4))})
    with pytest.raises(ArchitectureMismatchError, match="no affine layer named \\['bn1'\\]"):
        Theta.from_folded(m, {"bn1": (torch.ones(4), torch.zeros(4))})  # folded into conv1: not a layer
    sd = m.state_dict()
    sd["fc.weight"] = sd["fc.weight"][:, :10]
    with pytest.raises(ArchitectureMismatchError, match="layer 'fc'.*'fc.weight'"):
        Theta.from_state_dict(m, sd)
    sd = {k: v for k, v in m.state_dict().items() if k != "bn1.running_var"}
    with pytest.raises(ArchitectureMismatchError, match="no 'bn1.running_var'.*layer 'conv1'"):
        Theta.from_state_dict(m, sd)


def test_bad_folded_values_are_refused():
    m = _net()
    w, b = Theta.from_module(m).layers["conv2"]
    with pytest.raises(PathSaliencyError, match="integer storage"):
        Theta.from_folded(m, {"conv2": (w.to(torch.int8), b)})
    with pytest.raises(PathSaliencyError, match="NaN"):
        Theta.from_folded(m, {"conv2": (w * math.nan, b)})
    with pytest.raises(TypeError, match="pair"):
        Theta.from_folded(m, {"conv2": w})


def test_theta_of_another_architecture_is_refused():
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).double()
    with pytest.raises(ArchitectureMismatchError):
        ps.path_metric(_net(), Theta.from_module(other), SHAPE)


def test_to_module_computes_with_theta(assert_untouched):
    """The weights-only model: folded layers load exactly (refolding it gives theta back bit for bit) and
    compute what the module with those layers changed computes; state-dict layers load as given."""
    m, other = _net(), _perturbed(_net())
    changed = Theta.from_module(other).layers
    theta = Theta.from_folded(m, {k: changed[k] for k in ("conv1", "bn_skip", "fc")})
    with assert_untouched(m, other):
        plain = theta.to_module()
    assert plain is not m
    refolded = Theta.from_module(plain).layers
    for name, (w, b) in theta.layers.items():
        assert torch.equal(refolded[name][0], w) and torch.equal(refolded[name][1], b), name
    mixed = copy.deepcopy(m)
    mixed.load_state_dict({**m.state_dict(), **{k: v for k, v in other.state_dict().items()
                                                if k.split(".")[0] in ("conv1", "bn1", "bn_skip", "fc", "bn_fc")}})
    x = torch.randn(5, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), mixed(x), rtol=1e-12, atol=1e-12)
    from_sd = Theta.from_state_dict(m, other.state_dict()).to_module()
    for k, v in other.state_dict().items():
        assert torch.equal(from_sd.state_dict()[k], v), k


class _Twice(nn.Module):
    """``block`` is applied twice in sequence: a path may use its weights twice (the layer is reentrant)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block(torch.relu(self.block(x))))
        return self.head(x.flatten(1))


@pytest.mark.parametrize("as_theta", [False, True])
def test_layer_distance_of_a_reentrant_layer_is_the_metric_with_only_that_layer_changed(as_theta):
    torch.manual_seed(0)
    m = _Twice().double().eval()
    other = _perturbed(m)
    got = ps.layer_distances(m, Theta.from_module(other) if as_theta else other, SHAPE)
    for layer in ("stem", "block", "head"):
        only = {**m.state_dict(), **{k: v for k, v in other.state_dict().items() if k.startswith(layer + ".")}}
        want = ps.path_metric(m, only, SHAPE)
        assert want.log2 > -math.inf
        assert abs(got[layer].value - want.value) <= 1e-9 * want.value, layer
    assert got["block"].log2 == ps.path_metric(m, {**m.state_dict(), **{k: v for k, v in other.state_dict().items()
                                                                         if k.startswith("block.")}}, SHAPE).log2
