"""Per-layer distances: the path-norm is affine in one layer's weights, so the distance of a single-layer
change read from one forward/backward (<(A - M) u + (b_A - b_M), g>) equals the full path-metric."""
import copy

import pytest
import torch
import torch.nn as nn

import pathsaliency as ps
from pathsaliency import params
from pathsaliency.lifting import lift


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.shared = nn.Conv2d(6, 6, 1)  # called twice, on parallel branches (no path crosses both)
        self.head = nn.Linear(6 * 2, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        a = self.shared(x[:, :, :2])
        b = self.shared(x[:, :, 2:4])
        x = torch.cat([a, b], 2).mean((2, 3), keepdim=True).flatten(1)
        return self.head(torch.cat([x, x], 1))


def _randomized(seed):
    torch.manual_seed(seed)
    m = SmallResNet().double().eval()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    return m


def _perturbed(m, kind, seed):
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(m)
    with torch.no_grad():
        for p in other.parameters():
            if kind == "prune" and p.dim() > 1:  # weights only: zeroing a BN scale moves its folded shift
                p.mul_((torch.rand(p.shape, generator=g, dtype=p.dtype) > 0.4).to(p.dtype))
            elif kind == "prune":
                continue
            elif kind == "quantize":
                s = p.abs().max() / 7
                p.copy_(torch.round(p / s) * s)
            else:  # signs flipped and noise: nothing dominates
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


@pytest.mark.parametrize("kind", ["prune", "quantize", "noise"])
def test_each_layer_distance_equals_the_path_metric_of_that_layer_alone(kind, assert_untouched):
    m = _randomized(0)
    other = _perturbed(m, kind, 1)
    shape = (3, 8, 8)
    with assert_untouched(m, other):
        dists = ps.layer_distances(m, other, shape)
    plan = lift(m).plan
    ref, new = params.named_tensors(m), params.named_tensors(other)
    assert set(dists) == {s.name for s in plan.steps}
    for name, d in dists.items():
        state = dict(ref)
        for step in plan.module_steps(name):
            state.update({k: new[k] for k in params.step_tensor_names(step) if k in new})
        full = ps.path_metric(m, state, shape)
        assert d.exact == full.exact, name
        assert d.log2 == pytest.approx(full.log2, rel=1e-12, abs=1e-9), name
        assert d.relative == pytest.approx(full.relative, rel=1e-9)
    if kind == "prune":
        assert all(d.exact for d in dists.values())


def test_unchanged_layers_have_distance_zero():
    m = _randomized(2)
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.conv2.weight[0, 0, 0, 0] = 0
    dists = ps.layer_distances(m, other, (3, 8, 8))
    assert dists["conv2"].value > 0 and dists["conv2"].exact
    assert all(d.value == 0 for name, d in dists.items() if name != "conv2")
