"""Numerics that a naive implementation gets wrong (MATH.md sections 2, 5 and 6).

* cancellation: the path-metric lost by removing one weight is 1e-10 (or far less) of either path-norm;
  the coupled pass gets it right where subtracting two float64 path-norms does not, and it equals the
  path-magnitude score of that weight;
* rescaling invariance: a power-of-two rescaling changes the weights, not the function, not the path-norm,
  not the path-metric;
* overflow: path-norms beyond float32 and float64 are reported through their logarithm;
* precision: float32 (default) against float64.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from pathsaliency import path_magnitude, path_metric, path_norm, random_rescale
from pathsaliency.models.cifar_resnet import load_cifar_resnet


def _zeroed(model, name, idx):
    out = copy.deepcopy(model)
    with torch.no_grad():
        dict(out.named_parameters())[name][idx] = 0.0
    return out


def deep_mlp(depth=24, width=12, gain=12.0, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, width)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    layers += [nn.ReLU(), nn.Linear(width, 3)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(gain)
    return model, (6,)


class DeepCNN(nn.Module):
    def __init__(self, depth=8, width=8):
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        for i in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=i % 2 == 0), nn.BatchNorm2d(width), nn.ReLU()]
            if i == depth // 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def deep_cnn(seed=0):
    torch.manual_seed(seed)
    model = DeepCNN()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1000.0)
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(n, generator=gen) * 0.3 + 1.0)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval(), (3, 8, 8)


def _set_score(model, shape, name, idx, target):
    """Rescale the single weight ``name[idx]`` so that its relative path-magnitude is about ``target``."""
    score = float(path_magnitude(model, shape, dtype=torch.float64)[name][idx])
    with torch.no_grad():
        dict(model.named_parameters())[name][idx] *= target / score


@pytest.mark.parametrize("builder", [deep_mlp, deep_cnn], ids=["deep_mlp", "deep_cnn_bn"])
def test_removing_one_weight_costs_its_path_magnitude_even_when_path_norm_exceeds_1e30(builder, assert_untouched):
    model, shape = builder()
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    # weights whose share of the path-norm is about 1e-10 and 1e-18 (far below float64's resolution of it)
    tiny = {1e-10: (names[1], (0, 0) + ((1, 1) if model.state_dict()[names[1]].dim() == 4 else ())),
            1e-18: (names[-2], (1, 2) + ((0, 2) if model.state_dict()[names[-2]].dim() == 4 else ()))}
    for target, (name, idx) in tiny.items():
        _set_score(model, shape, name, idx, target)
    with assert_untouched(model):
        scores = path_magnitude(model, shape, dtype=torch.float64)
        norm = path_norm(model, shape, dtype=torch.float64)
    assert norm.log10 >= 30
    assert scores.scale.log2 == pytest.approx(norm.log2, rel=1e-12)
    gen = torch.Generator().manual_seed(1)
    picks = [(target, name, idx) for target, (name, idx) in tiny.items()]
    for name in names:  # plus two random weights of every layer
        shp = dict(model.named_parameters())[name].shape
        for _ in range(2):
            picks.append((None, name, tuple(int(torch.randint(s, (), generator=gen)) for s in shp)))
    for target, name, idx in picks:
        zeroed = _zeroed(model, name, idx)
        with assert_untouched(model, zeroed):
            d = path_metric(model, zeroed, shape)
        expected = float(scores[name][idx]) * norm.value
        assert d.exact is True
        assert d.value == pytest.approx(expected, rel=1e-6), (name, idx, d, expected)
        assert d.relative == pytest.approx(float(scores[name][idx]), rel=1e-6)
        if target is not None:
            assert float(scores[name][idx]) == pytest.approx(target, rel=1e-3)
            naive = norm.value - path_norm(zeroed, shape, dtype=torch.float64).value
            naive_err = abs(naive - d.value) / d.value
            print(f"share {target:g} of a path-norm of 1e{norm.log10:.1f}: coupled {d.value:.6e}, "
                  f"naive float64 subtraction {naive:.6e} (relative error {naive_err:.2g})")
            # the naive difference of two float64 path-norms is far off (at 1e-18 it cannot resolve it at all)
            assert naive_err > (1e-6 if target == 1e-10 else 0.5)


def test_path_magnitude_float32_default_matches_removal_to_float32_precision(assert_untouched):
    model, shape = deep_cnn(seed=1)
    with assert_untouched(model):
        scores = path_magnitude(model, shape)  # float32
    name = "features.6.weight"
    for idx in [(0, 0, 0, 0), (3, 5, 1, 2), (7, 7, 2, 2)]:
        d = path_metric(model, _zeroed(model, name, idx), shape)
        assert float(scores[name][idx]) == pytest.approx(d.relative, rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# Rescaling invariance
# ----------------------------------------------------------------------------------------------------


def _prune(model, frac, seed):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=gen) >= frac).to(m.weight.dtype))
    return out


def _quantize(model, bits):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                step = m.weight.abs().max() / (2 ** (bits - 1) - 1)
                m.weight.copy_(torch.round(m.weight / step) * step)
    return out


def _randomize_bn(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def _vgg11_bn():
    """torchvision's VGG-11-BN: its features (conv/BN/ReLU/max-pool), its 7x7 adaptive average pooling and
    flatten, and a classifier of the same form (Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear) but 64 wide
    instead of 4096, so that the test does not spend its time moving 130 M classifier weights around."""
    model = tvm.vgg11_bn()
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return _randomize_bn(model, 1)


RESCALE_MODELS = {
    "resnet18": (lambda: _randomize_bn(tvm.resnet18(), 0), (3, 64, 64)),
    "vgg11_bn": (_vgg11_bn, (3, 32, 32)),
    "cifar_resnet20": (lambda: load_cifar_resnet("resnet20"), (3, 32, 32)),
}


def _same_rescaling(a, ra, b, rb):
    """``rb`` is ``b`` under the same per-parameter factors that turned ``a`` into ``ra``."""
    pa, pra, pb, prb = (dict(m.named_parameters()) for m in (a, ra, b, rb))
    for n in pa:
        ratio = pra[n] / pa[n]
        mask = (pa[n] != 0) & (pb[n] != 0)
        assert torch.equal((prb[n] / pb[n])[mask], ratio[mask]), n


@pytest.mark.parametrize("name", list(RESCALE_MODELS))
def test_power_of_two_rescaling_preserves_function_path_norm_and_path_metric(name, assert_untouched):
    build, shape = RESCALE_MODELS[name]
    torch.manual_seed(0)
    model = build()
    with assert_untouched(model):
        rescaled = random_rescale(model, generator=torch.Generator().manual_seed(42))
    changed = [n for n, p in rescaled.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert len(changed) >= 4, "random_rescale changed nothing: the test would be vacuous"
    ratios = torch.cat([(p / dict(model.named_parameters())[n]).flatten() for n, p in rescaled.named_parameters()])
    assert ratios[torch.isfinite(ratios)].max() >= 128

    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x), model(x), rtol=1e-5, atol=1e-5 * float(model(x).abs().max()))

    with assert_untouched(model, rescaled):
        for dtype in (torch.float64, torch.float32):
            a = path_norm(model, shape, dtype=dtype)
            b = path_norm(rescaled, shape, dtype=dtype)
            assert b.value == pytest.approx(a.value, rel=1e-12), (dtype, a, b)
    del rescaled

    for make_other in (lambda m: _prune(m, 0.4, 1), lambda m: _quantize(m, 4)):
        other = make_other(model)
        r_model = random_rescale(model, generator=torch.Generator().manual_seed(7))
        r_other = random_rescale(other, generator=torch.Generator().manual_seed(7))
        _same_rescaling(model, r_model, other, r_other)
        with assert_untouched(model, other, r_model, r_other):
            d = path_metric(model, other, shape)
            rd = path_metric(r_model, r_other, shape)
        assert d.value > 0 and rd.exact == d.exact
        assert rd.value == pytest.approx(d.value, rel=1e-12), (d, rd)
        assert rd.norm.value == pytest.approx(d.norm.value, rel=1e-12)
        del other, r_model, r_other


# ----------------------------------------------------------------------------------------------------
# Overflow
# ----------------------------------------------------------------------------------------------------


def _independent_resnet_path_norm(model, shape):
    """The path-norm pass written out by hand for a torchvision ResNet, in float64 without any log-scale:
    batch-norm folded into the conv before it, every parameter replaced by its absolute value, ReLU by the
    identity, max-pooling by a window *sum* (a depthwise conv of ones with zero padding), ones as input."""
    m = copy.deepcopy(model).double().eval()

    def fold(conv, bn):
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        t = bn.bias - bn.running_mean * s
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=True).double()
        with torch.no_grad():
            new.weight.copy_((conv.weight * s.view(-1, 1, 1, 1)).abs())
            b = t if conv.bias is None else conv.bias * s + t
            new.bias.copy_(b.abs())
        return new

    with torch.no_grad():
        m.conv1, m.bn1 = fold(m.conv1, m.bn1), nn.Identity()
        m.relu = nn.Identity()
        mp = m.maxpool
        c = m.conv1.out_channels
        pool = nn.Conv2d(c, c, mp.kernel_size, mp.stride, mp.padding, groups=c, bias=False).double()
        pool.weight.fill_(1.0)
        m.maxpool = pool
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                block.relu = nn.Identity()
                for i in (1, 2, 3):
                    if hasattr(block, f"conv{i}"):
                        setattr(block, f"conv{i}", fold(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
                        setattr(block, f"bn{i}", nn.Identity())
                if block.downsample is not None:
                    block.downsample = nn.Sequential(fold(block.downsample[0], block.downsample[1]))
        m.fc.weight.abs_()
        m.fc.bias.abs_()
        out = m(torch.ones((1,) + tuple(shape), dtype=torch.float64))
    return float(out.sum())


def test_resnet152_path_norm_beyond_float32_equals_an_independent_float64_pass(assert_untouched):
    torch.manual_seed(0)
    model = _randomize_bn(tvm.resnet152(), 3)
    shape = (3, 224, 224)
    with assert_untouched(model):
        r64 = path_norm(model, shape, dtype=torch.float64)
        r32 = path_norm(model, shape)
    expected = _independent_resnet_path_norm(model, shape)
    print(f"resnet152 (random, 224x224): log10 path-norm {r64.log10:.6f} (float32 pass: {r32.log10:.6f})")
    assert math.isfinite(expected) and expected > 1e38  # a float32 pass without log-scale would overflow
    assert math.isfinite(r32.log10) and math.isfinite(r64.log10)
    assert r64.value == pytest.approx(expected, rel=1e-9)
    assert r32.log10 == pytest.approx(r64.log10, rel=1e-6)
    assert r32.value == pytest.approx(expected, rel=1e-4)


def _integer_path_norm(weights, biases, width_in):
    """Exact path-norm of an MLP with non-negative integer weights: a forward pass on ones in Python ints."""
    a = [1] * width_in
    for w, b in zip(weights, biases):
        a = [sum(wi * ai for wi, ai in zip(row, a)) + bi for row, bi in zip(w, b)]
    return sum(a)


def _int_mlp(depth, width, weight, bias_every):
    layers, ws, bs = [], [], []
    for i in range(depth):
        lin = nn.Linear(width, width)
        b = 3 if i % bias_every == 0 else 0
        with torch.no_grad():
            lin.weight.fill_(float(weight))
            lin.bias.fill_(float(b))
        layers += [lin, nn.ReLU()]
        ws.append([[weight] * width for _ in range(width)])
        bs.append([b] * width)
    return nn.Sequential(*layers[:-1]).eval(), ws, bs


def test_400_layer_mlp_path_norm_beyond_float64_has_the_analytic_log10_and_value_inf(assert_untouched):
    depth, width = 400, 2
    model, ws, bs = _int_mlp(depth, width, weight=5, bias_every=7)
    exact = _integer_path_norm(ws, bs, width)  # about 2 * 10**400: beyond float64
    log10_exact = math.log10(exact)
    assert 400 < log10_exact < 401
    with assert_untouched(model):
        r64 = path_norm(model, (width,), dtype=torch.float64)
        r32 = path_norm(model, (width,))
    print(f"400-layer MLP: log10 path-norm {r64.log10:.12f}, exact {log10_exact:.12f}")
    assert r64.log10 == pytest.approx(log10_exact, rel=1e-9)
    assert r32.log10 == pytest.approx(log10_exact, rel=1e-7)
    assert r64.value == math.inf and float(r64) == math.inf
    assert math.isfinite(r64.log2)

    # the path-metric of removing one weight is also beyond float64: exact in integers
    idx = (1, 0)
    pruned = _zeroed(model, "200.weight", idx)  # layer 100 (Sequential index 2 * 100)
    ws2 = [[row[:] for row in w] for w in ws]
    ws2[100][idx[0]][idx[1]] = 0
    exact_d = exact - _integer_path_norm(ws2, bs, width)
    with assert_untouched(model, pruned):
        d = path_metric(model, pruned, (width,))
        scores = path_magnitude(model, (width,), dtype=torch.float64)
    assert d.exact is True and d.value == math.inf
    assert d.log10 == pytest.approx(math.log10(exact_d), rel=1e-9)
    assert d.relative == pytest.approx(exact_d / exact, rel=1e-9)
    assert float(scores["200.weight"][idx]) == pytest.approx(exact_d / exact, rel=1e-9)
    assert scores.scale.log10 == pytest.approx(log10_exact, rel=1e-9)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_computed_in_float32_or_float64(half, assert_untouched):
    torch.manual_seed(0)
    model = _randomize_bn(tvm.resnet18(num_classes=10), 4)
    shape = (3, 32, 32)
    low = copy.deepcopy(model).to(half)
    up = copy.deepcopy(low).float()  # the same numbers, in float32
    q = _quantize(up, 4).to(half)
    with assert_untouched(low, q):
        for dtype in (torch.float32, torch.float64):
            r = path_norm(low, shape, dtype=dtype)
            assert math.isfinite(r.log10)
            assert r.value == pytest.approx(path_norm(up, shape, dtype=dtype).value, rel=1e-12)
        d = path_metric(low, q, shape)
        scores = path_magnitude(low, shape)
    assert d.value == pytest.approx(path_metric(up, q.float(), shape).value, rel=1e-12)
    assert scores["conv1.weight"].dtype == torch.float32 and torch.isfinite(scores["conv1.weight"]).all()  # the pass dtype
    with pytest.raises(ValueError):
        path_norm(low, shape, dtype=half)


def test_float32_default_agrees_with_float64_on_resnet18(assert_untouched):
    torch.manual_seed(0)
    model = _randomize_bn(tvm.resnet18(), 5)
    shape = (3, 224, 224)
    with assert_untouched(model):
        r32 = path_norm(model, shape)
        r64 = path_norm(model, shape, dtype=torch.float64)
    rel = abs(r32.value - r64.value) / r64.value
    print(f"resnet18 224x224: log10 path-norm {r64.log10:.9f}; float32 vs float64 relative difference {rel:.3g}")
    assert rel < 1e-5
