"""A tensor used by several modules (``c.weight = a.weight``) is one coordinate block of theta: it is
scored once, gets one mask, and its score is the path-metric lost by zeroing it (checked by explicit
removal), or it is refused when one path can use it twice."""
import copy

import pytest
import torch
import torch.nn as nn

import pathsaliency as ps
from pathsaliency.errors import PathSaliencyError


class Parallel(nn.Module):
    """``a`` and ``c`` share one weight on two parallel branches: no path uses it twice."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(3, 4), nn.Linear(3, 4)
        self.c.weight = self.a.weight
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x[:, :3])), torch.relu(self.c(x[:, 3:]))], 1))


class Serial(nn.Module):
    """``a`` and ``c`` share one weight on one path: a path uses it twice."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 4)
        self.c.weight = self.a.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.c(torch.relu(self.a(x)))))


def _parallel():
    torch.manual_seed(0)
    return Parallel().double()


def test_a_tied_weight_on_parallel_branches_is_scored_once_as_its_removal(assert_untouched):
    m = _parallel()
    with assert_untouched(m):
        scores = ps.path_magnitude(m, (6,), dtype=torch.float64)
    assert "c.weight" not in scores and set(scores) == {"a.weight", "out.weight"}
    for i in [(0, 0), (3, 2)]:
        cut = copy.deepcopy(m)  # the tie survives the copy: zeroing a.weight[i] zeroes both uses
        with torch.no_grad():
            cut.a.weight[i] = 0
        assert cut.c.weight is cut.a.weight
        d = ps.path_metric(m, cut, (6,))
        assert d.exact
        assert float(scores["a.weight"][i]) == pytest.approx(d.relative, rel=1e-9)


def test_a_tied_weight_gets_one_mask_under_either_criterion():
    m = _parallel()
    for criterion in ("path-magnitude", "magnitude"):
        pruned, masks = ps.prune_unstructured(m, 0.5, (6,), criterion=criterion, dtype=torch.float64)
        assert set(masks) == {"a.weight", "out.weight"}
        assert pruned.c.weight is pruned.a.weight
        assert int((~masks["a.weight"]).sum() + (~masks["out.weight"]).sum()) == round(0.5 * (12 + 16))


def test_a_tied_weight_used_twice_along_one_path_is_refused():
    torch.manual_seed(0)
    m = Serial().double()
    with pytest.raises(PathSaliencyError, match=r"a\.weight.*path_metric"):
        ps.path_magnitude(m, (4,), dtype=torch.float64)
