"""The central theorem (MATH.md sections 3-4) is never violated, and the path-metric has the properties
its definition gives it.

For every pair ``theta, theta'`` of the same architecture and every input ``x``:
``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D(theta, theta')``. Checked on at least 1,000
random triples per architecture family, with ``theta'`` obtained from ``theta`` by pruning, uniform
quantization to 2-8 bits, sign flips, noise, power-of-two rescalings and their combinations.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pathsaliency import lipschitz_bound, path_metric, path_norm, random_rescale

REL = 1e-9


# ----------------------------------------------------------------------------------------------------
# Architecture families
# ----------------------------------------------------------------------------------------------------


class MLPSkips(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 16, bias=False)
        self.l4 = nn.Linear(32, 4)

    def forward(self, x):
        h1 = F.relu(self.bn1(self.l1(x)))
        h2 = F.relu(self.l2(h1)) + h1
        h3 = F.relu(self.l3(h2)) + h2 + h1
        return self.l4(torch.cat([h3, h1], dim=1))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.pad == 0 else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = Block(4, 4, 1)
        self.layer2 = Block(4, 8, 2)
        self.linear = nn.Linear(8, 5)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class SmallDenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(4, 3), DenseLayer(7, 3))
        self.trans = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 6, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = DenseLayer(6, 3)
        self.norm = nn.BatchNorm2d(9)
        self.fc = nn.Linear(9, 4)

    def forward(self, x):
        out = self.block2(self.trans(self.block1(self.conv0(x))))
        out = F.relu(self.norm(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class SmallUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.bott = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = nn.Sequential(nn.Conv2d(12, 4, 3, padding=1), nn.ReLU())
        self.dec1 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)  # 8x8
        e2 = self.enc2(F.max_pool2d(e1, 2))  # 4x4
        b = self.bott(F.max_pool2d(e2, 2))  # 2x2
        d2 = self.dec2(torch.cat([e2, self.up1(b)], 1))  # 4x4
        up = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([e1, up], 1))  # 8x8
        return self.head(d1)  # a whole output map


FAMILIES = {
    "mlp_skips": (MLPSkips, (8,)),
    "cnn_bn_maxpool": (SmallCNN, (3, 8, 8)),
    "resnet_option_a": (SmallResNet, (3, 8, 8)),
    "densenet_concat": (SmallDenseNet, (3, 8, 8)),
    "unet_upsample_concat": (SmallUNet, (2, 8, 8)),
}


def make(family, seed, **kw):
    cls, shape = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(**kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1.0)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
    return model.eval(), shape


# ----------------------------------------------------------------------------------------------------
# Perturbations: theta -> theta'
# ----------------------------------------------------------------------------------------------------


def _weights(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prune(model, gen, frac=None, biases=True):
    """Zero a random fraction of every weight (and sometimes of a bias). A zeroed conv bias in front of a
    batch-norm is not a pruning of the folded theta (the folded bias ``s * b + t`` becomes ``t``), so the
    dominated case needs ``biases=False`` there."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in _weights(out):
            f = float(torch.rand((), generator=gen)) * 0.8 + 0.1 if frac is None else frac
            m.weight.mul_((torch.rand(m.weight.shape, generator=gen) >= f).float())
            if biases and m.bias is not None and float(torch.rand((), generator=gen)) < 0.3:
                m.bias.mul_((torch.rand(m.bias.shape, generator=gen) >= f).float())
    return out


def quantize(model, gen, bits=None):
    """Uniform symmetric per-tensor quantization (dequantized), ``bits`` in 2..8."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in _weights(out):
            b = int(torch.randint(2, 9, (), generator=gen)) if bits is None else bits
            for p in (m.weight, m.bias):
                if p is None:
                    continue
                step = p.abs().max() / (2 ** (b - 1) - 1)
                if step > 0:
                    p.copy_(torch.round(p / step) * step)
    return out


def flip_signs(model, gen):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in _weights(out):
            frac = float(torch.rand((), generator=gen)) * 0.3
            sign = torch.where(torch.rand(m.weight.shape, generator=gen) < frac, -1.0, 1.0)
            m.weight.mul_(sign)
    return out


def noise(model, gen):
    """Fine-tuning-like: every parameter and batch-norm statistic moves a little."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in list(out.named_parameters()) + list(out.named_buffers()):
            if not t.is_floating_point():
                continue
            t.mul_(1 + 0.05 * torch.randn(t.shape, generator=gen))
            if name.endswith("running_var"):
                t.abs_()
    return out


def rescale(model, gen):
    return random_rescale(model, factors=(0.25, 1, 2, 64), generator=gen)


RECIPES = {
    "identical": lambda m, g: copy.deepcopy(m),
    "prune": prune,
    "quantize": quantize,
    "flip_signs": flip_signs,
    "noise": noise,
    "rescale_only": rescale,
    "prune_then_quantize": lambda m, g: quantize(prune(m, g), g),
    "quantize_then_flip": lambda m, g: flip_signs(quantize(m, g), g),
    "rescale_then_quantize": lambda m, g: quantize(rescale(m, g), g),
    "prune_then_rescale": lambda m, g: rescale(prune(m, g), g),
    "noise_flip_rescale": lambda m, g: rescale(flip_signs(noise(m, g), g), g),
    "quantize_2bit": lambda m, g: quantize(m, g, bits=2),
}


def random_inputs(shape, n, gen):
    """Gaussian and non-negative inputs at scales below and above 1 (``max(1, ||x||_inf)`` both ways)."""
    x = torch.randn((n,) + tuple(shape), generator=gen, dtype=torch.float64)
    x[n // 2:] = x[n // 2:].abs()
    scales = torch.tensor([0.01, 0.2, 1.0, 3.0, 30.0], dtype=torch.float64)
    s = scales[torch.randint(len(scales), (n,), generator=gen)]
    return x * s.view((-1,) + (1,) * len(shape))


def _out64(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_distance_never_exceeds_the_certified_lipschitz_bound(family, assert_untouched):
    num_thetas, num_x = 24, 48  # 24 * 48 = 1,152 triples (theta, theta', x) per family
    recipes = list(RECIPES)
    violations, checked, positive = [], 0, 0
    for k in range(num_thetas):
        model, shape = make(family, seed=1000 * k + len(family))
        gen = torch.Generator().manual_seed(k)
        if k % 3 == 1:  # the reference itself in a rescaled parametrisation
            model = rescale(model, gen)
        recipe = recipes[k % len(recipes)]
        other = RECIPES[recipe](model, gen)
        x = random_inputs(shape, num_x, gen)
        other_arg = other if k % 2 == 0 else other.state_dict()  # a module or a state dict
        with assert_untouched(model, other):
            bound = lipschitz_bound(model, other_arg, x)
        assert bound.dtype == torch.float64 and bound.shape == (num_x,)
        diff = (_out64(model, x) - _out64(other, x)).reshape(num_x, -1).abs().sum(1)
        scale = _out64(model, x).reshape(num_x, -1).abs().sum(1).clamp_min(1.0)
        ok = diff <= bound * (1 + REL) + 1e-13 * scale
        checked += num_x
        positive += int((diff > 0).sum())
        for i in torch.nonzero(~ok).flatten().tolist():
            violations.append((recipe, k, i, float(diff[i]), float(bound[i])))
    assert checked >= 1000
    assert positive >= 900  # the triples are not trivial
    assert not violations, f"{len(violations)} violations of the bound (recipe, theta, x, observed, bound): {violations[:10]}"


def test_lipschitz_bound_is_max_of_one_and_sup_norm_times_path_metric(assert_untouched):
    model, shape = make("cnn_bn_maxpool", 1)
    other = quantize(model, torch.Generator().manual_seed(1), bits=4)
    x = torch.randn(6, *shape, dtype=torch.float32)
    x[0] *= 1e-3
    x[1] *= 100
    with assert_untouched(model, other):
        bound = lipschitz_bound(model, other, x)
        d = path_metric(model, other, shape)
    expected = x.reshape(6, -1).abs().amax(1).double().clamp_min(1.0) * d.value
    torch.testing.assert_close(bound, expected, rtol=1e-12, atol=0)
    assert float(bound[0]) == pytest.approx(d.value, rel=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_pair_is_exact_and_equals_difference_of_path_norms(family, assert_untouched):
    for seed in range(2):
        model, shape = make(family, seed)
        pruned = prune(model, torch.Generator().manual_seed(seed), frac=0.3, biases=False)
        with assert_untouched(model, pruned):
            d = path_metric(model, pruned, shape)
            d_rev = path_metric(pruned, model, shape)
            n_full = path_norm(model, shape, dtype=torch.float64)
            n_pruned = path_norm(pruned, shape, dtype=torch.float64)
        assert d.exact is True and d_rev.exact is True
        assert n_pruned.value < n_full.value
        assert d.value == pytest.approx(n_full.value - n_pruned.value, rel=REL)
        assert d_rev.value == pytest.approx(d.value, rel=REL)
        # .norm is the path-norm of the reference (the first argument), .relative = D / norm
        assert d.norm.value == pytest.approx(n_full.value, rel=REL)
        assert d_rev.norm.value == pytest.approx(n_pruned.value, rel=REL)
        assert d.relative == pytest.approx(d.value / n_full.value, rel=REL)
        assert d_rev.relative == pytest.approx(d.value / n_pruned.value, rel=REL)


def test_shrinking_weights_with_the_same_signs_is_exact_dominated_case(assert_untouched):
    model, shape = make("resnet_option_a", 3)
    shrunk = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in _weights(shrunk):
            m.weight.mul_(torch.rand(m.weight.shape, generator=gen))
    with assert_untouched(model, shrunk):
        d = path_metric(model, shrunk, shape)
        a = path_norm(model, shape, dtype=torch.float64).value
        b = path_norm(shrunk, shape, dtype=torch.float64).value
    assert d.exact is True
    assert d.value == pytest.approx(a - b, rel=REL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_pair_is_not_exact_and_lies_between_norm_difference_and_sum(family, assert_untouched):
    model, shape = make(family, 5)
    q = quantize(model, torch.Generator().manual_seed(5), bits=3)
    with assert_untouched(model, q):
        d = path_metric(model, q, shape)
        a = path_norm(model, shape, dtype=torch.float64).value
        b = path_norm(q, shape, dtype=torch.float64).value
    assert d.exact is False
    # reverse triangle inequality and D <= ||Phi(theta)|| + ||Phi(theta')||
    assert abs(a - b) <= d.value * (1 + REL)
    assert d.value <= (a + b) * (1 + REL)
    assert d.norm.value == pytest.approx(a, rel=REL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_path_metric_of_a_model_with_itself_is_zero(family, assert_untouched):
    model, shape = make(family, 6)
    same = copy.deepcopy(model)
    with assert_untouched(model, same):
        for other in (model, same, same.state_dict()):
            d = path_metric(model, other, shape)
            assert d.value == 0.0 and d.log2 == -math.inf
            assert d.exact is True and d.relative == 0.0
        assert (lipschitz_bound(model, same, torch.randn(3, *shape)) == 0).all()


@pytest.mark.parametrize("recipe", ["quantize", "flip_signs", "noise", "prune", "noise_flip_rescale"])
def test_path_metric_is_symmetric(recipe, assert_untouched):
    model, shape = make("densenet_concat", 7)
    other = RECIPES[recipe](model, torch.Generator().manual_seed(7))
    with assert_untouched(model, other):
        d1 = path_metric(model, other, shape)
        d2 = path_metric(other, model, shape)
        d3 = path_metric(model, other.state_dict(), shape)
    assert d1.value > 0
    assert d2.value == pytest.approx(d1.value, rel=REL)
    assert d3.value == pytest.approx(d1.value, rel=1e-15) and d3.exact == d1.exact
    assert d1.exact == d2.exact


def _with_params(model, fn):
    """A copy of a batch-norm-free model whose conv/linear parameters are ``fn(name, tensor)``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(fn(name, p))
    return out


def test_certified_distance_is_at_most_the_max_min_bound_for_same_sign_pairs(assert_untouched):
    """MATH.md section 4: D <= ||Phi(max(a, b))|| - ||Phi(min(a, b))|| (supermodularity)."""
    torch.manual_seed(9)
    model = MLPSkips(bn=False).eval()
    shape = (8,)
    gen = torch.Generator().manual_seed(9)
    for maker in (lambda m: quantize(m, gen, bits=3), lambda m: noise(m, gen)):
        other = maker(model)
        theirs = dict(other.named_parameters())
        same_sign = all(bool((p * theirs[n] >= 0).all()) for n, p in model.named_parameters())
        if not same_sign:  # noise can flip a sign only through a factor 1 + 0.05 N < 0: practically never
            continue
        big = _with_params(model, lambda n, p: torch.maximum(p.abs(), theirs[n].abs()))
        small = _with_params(model, lambda n, p: torch.minimum(p.abs(), theirs[n].abs()))
        with assert_untouched(model, other):
            d = path_metric(model, other, shape)
        maxmin = path_metric(big, small, shape)
        assert maxmin.exact is True
        assert d.value <= maxmin.value * (1 + REL)
