"""Operator semantics of the registry (stochastic depth, channel maps) and how refusals are reported."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision.ops as tvo

import pathsaliency as ps
from pathsaliency import ops
from pathsaliency.errors import PathSaliencyError, UnsupportedModelError


class Residual(nn.Module):
    """``x + drop(lin2(relu(lin1(x))))``; ``drop`` is stochastic depth or nothing."""

    def __init__(self, drop=None):
        super().__init__()
        self.lin1, self.lin2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.drop = drop

    def forward(self, x):
        h = self.lin2(F.relu(self.lin1(x)))
        if self.drop is not None:
            h = self.drop(h)
        return self.head(F.relu(x + h))


def test_stochastic_depth_in_eval_mode_is_the_identity(assert_untouched):
    torch.manual_seed(0)
    plain = Residual().eval()
    dropped = Residual(tvo.StochasticDepth(0.3, "row"))
    dropped.load_state_dict(plain.state_dict())
    dropped.train()  # captured in eval mode whatever the flag: stochastic depth is then the identity
    with assert_untouched(plain, dropped):
        want = ps.path_norm(plain, (4,), dtype=torch.float64)
        assert ps.path_norm(dropped, (4,), dtype=torch.float64).log2 == want.log2
        a, b = ps.path_magnitude(plain, (4,), dtype=torch.float64), ps.path_magnitude(dropped, (4,), dtype=torch.float64)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stochastic_depth_forced_into_training_is_refused(assert_untouched):
    gm = fx.symbolic_trace(Residual(tvo.StochasticDepth(0.3, "row")).eval())
    node = next(n for n in gm.graph.nodes if n.target is tvo.stochastic_depth)
    node.args = node.args[:3] + (True,)  # as a forward that passes training=True whatever the mode
    gm.recompile()
    with assert_untouched(gm), pytest.raises(UnsupportedModelError, match="training=True") as info:
        ps.path_norm(gm, (4,))
    assert [o[0] for o in info.value.offenders] == ["stochastic_depth"]


class ManyGates(nn.Module):
    """Twelve sigmoid gates and three GELUs: two operators, fifteen offending nodes."""

    def __init__(self):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(4, 4) for _ in range(12))
        self.gelus = nn.ModuleList(nn.GELU() for _ in range(3))

    def forward(self, x):
        for lin in self.lins:
            x = torch.sigmoid(lin(x))
        for g in self.gelus:
            x = g(x)
        return x


def test_refusals_are_grouped_by_operator_with_the_first_nodes_named(assert_untouched):
    model = ManyGates().eval()
    with assert_untouched(model), pytest.raises(UnsupportedModelError) as info:
        ps.path_norm(model, (4,))
    err = info.value
    assert len(err.offenders) == 15  # every offender is still listed on the exception
    lines = str(err).splitlines()
    assert len(lines) == 3, str(err)  # the header and one line per operator
    sig = next(line for line in lines if "sigmoid" in line)
    assert "12 x" in sig and "node 'sigmoid'" in sig and "node 'sigmoid_2'" in sig and "and 9 more" in sig
    assert "node 'sigmoid_3'" not in sig
    gelu = next(line for line in lines if "GELU" in line)
    assert "3 x GELU module" in gelu and "GELU module 'gelus.2'" in gelu and "more" not in gelu


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.main, self.aux = nn.Conv2d(2, 4, 3), nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.body(x)).mean((2, 3))
        return self.main(h), torch.sigmoid(self.aux(h))


def test_a_tuple_output_reports_the_output_choice_and_the_real_offenders(assert_untouched):
    model = TwoHeads().eval()
    with assert_untouched(model), pytest.raises(UnsupportedModelError, match="output=") as info:
        ps.path_norm(model, (2, 5, 5))
    names = [o[0] for o in info.value.offenders]
    assert names[0] == "output" and "sigmoid" in names, info.value.offenders
    assert ps.path_norm(model, (2, 5, 5), output=0).log2 > -float("inf")  # the main head is a ReLU-DAG


def test_a_layer_that_feeds_only_another_output_is_named_as_such(assert_untouched):
    model = TwoHeads().eval()
    removal = ps.Removal("aux", "out", torch.tensor([0]), torch.tensor([0]))
    with assert_untouched(model), pytest.raises(PathSaliencyError, match="not part of the graph of the selected output"):
        ps.channel_saliency(model, (2, 5, 5), [removal], 1, output=0)
    with pytest.raises(PathSaliencyError, match="no module named 'nope'"):
        ps.channel_saliency(model, (2, 5, 5), [ps.Removal("nope", "out", torch.tensor([0]), torch.tensor([0]))], 1,
                            output=0)


class Channels(nn.Module):
    def forward(self, x):
        a = F.relu(x)
        b = torch.cat([a, x], 1)
        c = torch.cat([a, x], 2)
        return torch.flatten(F.max_pool2d(b, 2), 1), c.flatten(2), F.avg_pool2d(a, 2), a.flatten(1)


def test_each_action_says_how_it_maps_channels():
    gm = fx.symbolic_trace(Channels())
    found = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            action = ops.action_for(n, gm, lambda a: isinstance(a, fx.Node))
            found[n.name] = action.channels
    assert found == {"relu": ops.ChannelMap.KEEP, "cat": ops.ChannelMap.CONCAT, "cat_1": None,
                     "max_pool2d": ops.ChannelMap.KEEP, "flatten": ops.ChannelMap.FLATTEN,
                     "flatten_1": None, "avg_pool2d": ops.ChannelMap.KEEP, "flatten_2": ops.ChannelMap.FLATTEN}, found


def test_an_unregistered_operator_is_a_lookup_miss_with_the_node_named(assert_untouched):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.erf(self.lin(x))

    model = Odd().eval()
    with assert_untouched(model), pytest.raises(UnsupportedModelError, match="not in the supported set") as info:
        ps.path_norm(model, (3,))
    assert info.value.offenders[0][0] == "erf"


class ScaledHead(nn.Module):
    """``c * lin(x)`` with the constant on the left (``left=True``) or on the right."""

    def __init__(self, left):
        super().__init__()
        self.lin, self.left = nn.Linear(4, 3), left

    def forward(self, x):
        return 4 * self.lin(x) if self.left else self.lin(x) * 4


@pytest.mark.parametrize("left", [True, False])
def test_multiplying_by_a_power_of_two_adds_its_exponent_to_the_path_norm(left, assert_untouched):
    """Every path gains the factor 4: log2 ||Phi|| grows by exactly 2, whichever side the number is on."""
    torch.manual_seed(0)
    model = ScaledHead(left)
    with assert_untouched(model):
        scaled = ps.path_norm(model, (4,), dtype=torch.float64).log2
    plain = ps.path_norm(nn.Sequential(model.lin), (4,), dtype=torch.float64).log2
    assert scaled - plain == 2.0
