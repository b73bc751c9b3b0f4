"""A cached result never outlives what it was computed from.

Every public function caches per model (the captured graph, the prepared weights, the forward/backward
profile). Each test scores a model, changes it in one of the ways users and pruning tools do, scores it
again, and compares with a fresh deep copy (which has no cache): the two must agree exactly.
"""
import copy

import pytest
import torch
import torch.nn as nn

import pathsaliency as ps

SHAPE = (3, 12, 12)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.use_skip = True
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        y = self.bn2(self.conv2(x))
        if self.use_skip:
            y = y + x
        y = torch.relu(y).mean((2, 3))
        return self.head(y)


def _net(seed=0):
    torch.manual_seed(seed)
    m = Net().double().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return m


def _removals():
    return [ps.Removal("conv2", "out", torch.arange(6), torch.arange(6))]


SCORERS = {
    "path_norm": lambda m: torch.tensor(ps.path_norm(m, SHAPE, dtype=torch.float64).log2),
    "path_magnitude": lambda m: torch.cat([s.flatten() for s in ps.path_magnitude(m, SHAPE, dtype=torch.float64).values()]),
    "channel_saliency": lambda m: ps.channel_saliency(m, SHAPE, _removals(), 6, dtype=torch.float64),
    "channel_saliency_first_order": lambda m: ps.channel_saliency(m, SHAPE, _removals(), 6, exact=False,
                                                                   dtype=torch.float64),
    "path_metric": lambda m: torch.tensor(ps.path_metric(m, _net(1), SHAPE).log2),
    "path_metric_state_dict": lambda m: torch.tensor(
        ps.path_metric(m, {**m.state_dict(), "head.weight": m.head.weight * 0.5}, SHAPE).log2),
    "path_metric_other": lambda m: torch.tensor(ps.path_metric(_net(1), m, SHAPE).log2),
    "layer_distances": lambda m: torch.tensor([d.log2 for d in ps.layer_distances(m, _net(1), SHAPE).values()]),
}


def _data_write(m):
    m.conv1.weight.data[0:3] = 0


def _no_grad_inplace(m):
    with torch.no_grad():
        m.conv2.weight.mul_(-2.0)
        m.bn1.running_var.add_(1.0)


def _load_state_dict(m):
    m.load_state_dict(_net(2).state_dict())


def _copy(m):
    with torch.no_grad():
        m.head.weight.copy_(torch.randn_like(m.head.weight))
        m.bn2.bias.copy_(torch.randn_like(m.bn2.bias))


def _data_rebind(m):
    m.conv2.weight.data = torch.randn_like(m.conv2.weight)


VALUE_CHANGES = {"data_write": _data_write, "no_grad_inplace": _no_grad_inplace, "load_state_dict": _load_state_dict,
                 "copy_": _copy, "data_rebind": _data_rebind}


def _assert_fresh(score, m):
    assert torch.equal(score(m), score(copy.deepcopy(m)))


@pytest.mark.parametrize("change", VALUE_CHANGES)
@pytest.mark.parametrize("scorer", SCORERS)
def test_a_value_written_between_two_calls_is_seen(scorer, change):
    _assert_change_seen(SCORERS[scorer], VALUE_CHANGES[change])


def _assert_change_seen(score, change):
    m = _net()
    before = score(m)
    change(m)
    after = score(m)
    assert not torch.equal(before, after)
    _assert_fresh(score, m)


def _padding(m):
    m.conv1.padding = (0, 0)


def _stride(m):
    m.conv1.stride = (2, 2)


def _dilation(m):
    m.conv2.dilation = (2, 2)
    m.conv2.padding = (2, 2)


def _eps(m):
    m.bn2.eps = 0.5


def _pool_kernel(m):
    m.pool.kernel_size = 3


def _flag(m):
    m.use_skip = False


def _replace_module(m):
    m.pool = nn.AvgPool2d(2)


STRUCTURE_CHANGES = {"padding": _padding, "stride": _stride, "dilation": _dilation, "bn_eps": _eps,
                     "max_pool_kernel": _pool_kernel, "forward_flag": _flag, "replaced_module": _replace_module}


@pytest.mark.parametrize("change", STRUCTURE_CHANGES)
@pytest.mark.parametrize("scorer", ["path_norm", "path_magnitude", "channel_saliency", "path_metric_state_dict"])
def test_a_structural_change_between_two_calls_is_seen(scorer, change):
    _assert_change_seen(SCORERS[scorer], STRUCTURE_CHANGES[change])


def test_max_pool_kernel_change_gives_the_new_norm():
    m = _net()
    ps.path_norm(m, SHAPE, dtype=torch.float64)
    m.pool.kernel_size = 4
    assert ps.path_norm(m, SHAPE, dtype=torch.float64).log2 == ps.path_norm(copy.deepcopy(m), SHAPE,
                                                                           dtype=torch.float64).log2


@pytest.mark.parametrize("scorer", ["path_norm", "path_magnitude", "channel_saliency", "path_metric_other"])
def test_torch_pruning_between_two_calls_is_seen(scorer):
    tp = pytest.importorskip("torch_pruning")
    m, score = _net(), SCORERS[scorer]
    if scorer == "channel_saliency":  # conv2 loses channels: score conv1's
        score = lambda x: ps.channel_saliency(  # noqa: E731
            x, SHAPE, [ps.Removal("conv1", "out", torch.arange(6), torch.arange(6))], 6, dtype=torch.float64)
    if scorer == "path_metric_other":
        ref = _net()
        score = lambda x: torch.tensor(ps.path_metric(ref, x, SHAPE).log2)  # noqa: E731
    before = score(m)
    # zero two output channels of conv1 in place, the way torch-pruning's soft pruning writes them
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.zeros(1, *SHAPE, dtype=torch.float64))
    group = dg.get_pruning_group(m.conv1, tp.prune_conv_out_channels, idxs=[0, 1])
    for dep, idxs in group:
        layer = dep.target.module
        if isinstance(layer, nn.Conv2d) and dep.handler.__name__ == "prune_out_channels":
            layer.weight.data[idxs] = 0
            layer.bias.data[idxs] = 0
    after = score(m)
    assert not torch.equal(before, after)
    _assert_fresh(score, m)


def test_torch_pruning_structural_pruning_between_two_calls_is_seen():
    tp = pytest.importorskip("torch_pruning")
    m = _net()
    ps.path_norm(m, SHAPE, dtype=torch.float64)
    ps.path_magnitude(m, SHAPE, dtype=torch.float64)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.zeros(1, *SHAPE, dtype=torch.float64))
    dg.get_pruning_group(m.conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    m.use_skip = m.use_skip  # no-op: the skip still adds matching widths after pruning the whole group
    _assert_fresh(lambda x: torch.tensor(ps.path_norm(x, SHAPE, dtype=torch.float64).log2), m)
    _assert_fresh(lambda x: torch.cat([s.flatten() for s in ps.path_magnitude(x, SHAPE, dtype=torch.float64).values()]), m)


def test_repeated_calls_on_an_unchanged_model_use_the_cache_and_leave_it_untouched(assert_untouched):
    m = _net()
    with assert_untouched(m):
        a = ps.channel_saliency(m, SHAPE, _removals(), 6, dtype=torch.float64)
        b = ps.channel_saliency(m, SHAPE, _removals(), 6, dtype=torch.float64)
    assert torch.equal(a, b)
