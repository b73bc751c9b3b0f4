"""Bad or degenerate input gets a clear error naming what is wrong, never a wrong number or a raw
Python/torch error."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import pathsaliency as ps
from pathsaliency.errors import ArchitectureMismatchError, PathSaliencyError


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("var, eps", [(0.0, 0.0), (-1.0, 1e-5), (-1e-5, 1e-5)])
def test_a_batchnorm_with_non_positive_variance_is_refused_by_name(var, eps):
    m, ref = _mlp(), _mlp(1)
    m[1].eps = ref[1].eps = eps
    with torch.no_grad():
        m[1].running_var[2] = var
    for call in (lambda: ps.path_norm(m, (3,)), lambda: ps.path_magnitude(m, (3,)),
                 lambda: ps.path_metric(ref, m, (3,)), lambda: ps.path_metric(ref, m.state_dict(), (3,))):
        with pytest.raises(PathSaliencyError, match=r"batch-norm '1'.*running_var \+ eps"):
            call()


def test_path_value_repr_never_crashes():
    for log2 in (math.nan, math.inf, -math.inf, 2000.0, -2000.0, 3.0):
        v = ps.PathValue(log2)
        assert repr(v).startswith("PathValue(")
        if math.isnan(log2):
            assert math.isnan(v.value)


@pytest.mark.parametrize("q", [float("inf"), float("nan"), 0, -1])
def test_q_must_be_positive_and_finite(q):
    with pytest.raises(ValueError, match="q must be"):
        ps.path_norm(_mlp(), (3,), q=q)


@pytest.mark.parametrize("shape, hint", [("3,16,16", "tuple"), (3, r"\(3,\)"), ((-3,), "positive"), ((0,), "positive"),
                                         ((3.5,), "int"), ((), "at least one"), ((True,), "int")])
def test_input_shape_must_be_a_tuple_of_positive_ints(shape, hint):
    for call in (lambda: ps.path_norm(_mlp(), shape), lambda: ps.path_magnitude(_mlp(), shape),
                 lambda: ps.channel_saliency(_mlp(), shape, [], 0), lambda: ps.path_metric(_mlp(), _mlp(1), shape)):
        with pytest.raises(PathSaliencyError, match=f"input_shape.*{hint}"):
            call()


def test_input_shape_accepts_a_list_a_size_and_numpy_ints():
    np = pytest.importorskip("numpy")
    m = _mlp()
    ref = ps.path_norm(m, (3,)).log2
    for shape in ([3], torch.Size([3]), (np.int64(3),), torch.zeros(3)):
        assert ps.path_norm(m, shape).log2 == ref


def test_dtype_may_be_given_as_a_string_and_a_wrong_one_lists_the_spellings():
    m = _mlp()
    assert ps.path_norm(m, (3,), dtype="float64").log2 == ps.path_norm(m, (3,), dtype=torch.float64).log2
    with pytest.raises(ValueError, match="float32.*float64"):
        ps.path_norm(m, (3,), dtype="half")


@pytest.mark.parametrize("which", ["reference", "other"])
def test_the_nan_error_of_path_metric_names_the_model_and_the_tensors(which):
    bad = _mlp()
    with torch.no_grad():
        bad[3].weight[0, 0] = math.nan
    args = (bad, _mlp()) if which == "reference" else (_mlp(), bad)
    with pytest.raises(PathSaliencyError, match=f"{which}.*3.weight"):
        ps.path_metric(*args, (3,))
    with pytest.raises(PathSaliencyError, match=r"other.*3.weight"):
        ps.path_metric(_mlp(), bad.state_dict(), (3,))


def test_extra_keys_of_a_state_dict_are_ignored_and_missing_ones_refused():
    m, other = _mlp(), _mlp(1)
    sd = other.state_dict()
    d = ps.path_metric(m, sd, (3,)).log2
    assert ps.path_metric(m, {**sd, "unused.weight": torch.zeros(5)}, (3,)).log2 == d
    del sd["1.running_var"]
    with pytest.raises(ArchitectureMismatchError, match="1.running_var"):
        ps.path_metric(m, sd, (3,))


@pytest.mark.parametrize("model", [nn.Sequential(), nn.Sequential(nn.ReLU()), nn.Sequential(nn.Flatten())])
def test_path_magnitude_of_a_model_without_weights_says_so(model):
    with pytest.raises(PathSaliencyError, match="no conv or linear weight"):
        ps.path_magnitude(model, (3, 2))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def test_an_unused_module_blocking_pruning_points_to_exclude():
    with pytest.raises(ValueError, match=r"unused.weight.*exclude="):
        ps.prune_unstructured(Unused(), 0.5, (3,))
    _, masks = ps.prune_unstructured(Unused(), 0.5, (3,), exclude=lambda name, w: name.startswith("unused"))
    assert list(masks) == ["used.weight"]


@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(3, 2), (3,)), (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5)),
                                         (lambda: nn.Conv2d(2, 3, 3), (1, 2, 5, 5))])
def test_a_bare_conv_or_linear_model_is_a_one_layer_network(make, shape, assert_untouched):
    torch.manual_seed(0)
    m = make().double()
    with assert_untouched(m):
        norm = ps.path_norm(m, shape, dtype=torch.float64)
        scores = ps.path_magnitude(m, shape, dtype=torch.float64)
        _, masks = ps.prune_unstructured(m, 0.5, shape, dtype=torch.float64)
    wrapped = nn.Sequential(m)
    assert norm.log2 == pytest.approx(ps.path_norm(wrapped, shape, dtype=torch.float64).log2, rel=1e-12)
    assert set(scores) == {"weight"} and set(masks) == {"weight"}
    assert torch.allclose(scores["weight"], ps.path_magnitude(wrapped, shape, dtype=torch.float64)["0.weight"])
    zeroed = copy.deepcopy(m)
    with torch.no_grad():
        zeroed.weight.zero_()
    assert ps.path_metric(m, zeroed, shape).exact


@pytest.mark.parametrize("change", [lambda m: setattr(m[1], "eps", 0.5), lambda m: setattr(m[0], "bias", None)])
def test_path_metric_refuses_models_whose_layers_differ(change):
    other = _mlp(1)
    change(other)
    with pytest.raises(ArchitectureMismatchError, match="'[01]"):
        ps.path_metric(_mlp(), other, (3,))


def test_path_metric_refuses_convs_with_different_padding():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    b = copy.deepcopy(a)
    b[0].padding, b[0].dilation = (2, 2), (2, 2)  # same output size, another network
    with pytest.raises(ArchitectureMismatchError, match="padding"):
        ps.path_metric(a, b, (2, 4, 4))


def test_unused_state_dict_keys_are_ignored_alike_and_an_override_must_name_tensors():
    """One policy (issue 15): a complete state dict may hold keys the architecture does not use, for
    path_metric and Theta.from_state_dict alike; the report's ``effective_weights`` is an override of the
    reference's tensors, so a key that names none of them is refused with that reason."""
    m, other = _mlp(), _mlp(1)
    sd = {**other.state_dict(), "unused.weight": torch.zeros(5)}
    d = ps.path_metric(m, other, (3,))
    assert ps.path_metric(m, sd, (3,)).log2 == d.log2
    assert ps.path_metric(m, ps.Theta.from_state_dict(m, sd), (3,)).log2 == d.log2
    data = [(torch.rand(4, 3), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ArchitectureMismatchError, match=r"\['unused.weight'\] name none of its tensors"):
        ps.robustness_report(m, other, data, effective_weights=sd, input_shape=(3,))
