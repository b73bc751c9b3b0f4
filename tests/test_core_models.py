"""Which models the library accepts, and how it refuses the others (MATH.md section 1).

* every torchvision classification model made only of ReLU-DAG operators has a finite positive path-norm;
* every other one raises :class:`UnsupportedModelError` naming the offending nodes and their operators;
* the pretrained CIFAR ResNet-20/32 are supported;
* output selection, wrong inputs, broken parameters and mismatched pairs give clear errors;
* the library never modifies, never switches to eval, and never calls the hooks of a user's model.
"""
from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

from pathsaliency import (ArchitectureMismatchError, PathSaliencyError, UnsupportedModelError, lipschitz_bound,
                          path_magnitude, path_metric, path_norm, random_rescale)
from pathsaliency.models.cifar_resnet import load_cifar_resnet

# ----------------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------------

S64 = (3, 64, 64)
SUPPORTED = {
    "resnet18": ({}, S64), "resnet34": ({}, S64), "resnet50": ({}, S64), "resnet101": ({}, S64),
    "resnet152": ({}, S64), "resnext50_32x4d": ({}, S64), "wide_resnet50_2": ({}, S64),
    "vgg11": ({}, S64), "vgg11_bn": ({}, S64), "vgg16": ({}, S64), "vgg16_bn": ({}, S64),
    "alexnet": ({}, S64), "densenet121": ({}, S64), "squeezenet1_0": ({}, S64), "squeezenet1_1": ({}, S64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, S64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, (3, 299, 299)),
    "shufflenet_v2_x0_5": ({}, S64), "shufflenet_v2_x1_0": ({}, S64), "mnasnet0_5": ({}, S64),
    "regnet_x_400mf": ({}, S64),
}

# model -> operators (as the error names them) of which at least one must be listed
UNSUPPORTED = {
    "mobilenet_v2": ["ReLU6"],
    "mobilenet_v3_small": ["Hardswish", "Hardsigmoid"],
    "efficientnet_b0": ["SiLU", "Sigmoid"],
    "vit_b_16": ["LayerNorm", "MultiheadAttention", "GELU"],
    "swin_t": ["LayerNorm", "GELU"],
    "convnext_tiny": ["LayerNorm", "GELU"],
    "regnet_y_400mf": ["Sigmoid"],
    "maxvit_t": ["GELU", "LayerNorm", "<trace>"],  # "if it traces"
}


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_torchvision_relu_dag_models_have_a_finite_positive_path_norm(name, assert_untouched):
    kwargs, shape = SUPPORTED[name]
    torch.manual_seed(0)
    model = getattr(tvm, name)(**kwargs).eval()
    with assert_untouched(model):
        r = path_norm(model, shape)
    print(f"{name} {shape}: log10 path-norm {r.log10:.4f}")
    assert math.isfinite(r.log10)
    assert r.log2 > -math.inf and (r.value > 0)


def _offender_modules_are_real(model, offenders):
    """Each offender names a graph node and an operator; a module operator names a real submodule."""
    for node, op, reason in offenders:
        assert node and op and reason
        m = re.match(r"(\w+) module '([\w.\-]+)'", op)
        if m:
            assert type(model.get_submodule(m.group(2))).__name__ == m.group(1), (node, op)


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_torchvision_models_outside_relu_dags_raise_unsupported_model_error_naming_nodes(name, assert_untouched):
    torch.manual_seed(0)
    model = getattr(tvm, name)().eval()
    with assert_untouched(model):
        with pytest.raises(UnsupportedModelError) as info:
            path_norm(model, (3, 224, 224))
    err = info.value
    msg = str(err)
    assert err.offenders, msg
    first_node, first_op, _ = err.offenders[0]
    assert f"node '{first_node}'" in msg and first_op in msg
    assert any(op_name in msg for op_name in UNSUPPORTED[name]), msg[:2000]
    if first_node != "<trace>":
        _offender_modules_are_real(model, err.offenders)
    if name == "regnet_y_400mf":  # squeeze-excitation: sigmoid gate times activation
        assert "multiplication of two activations" in msg


# ----------------------------------------------------------------------------------------------------
# CIFAR ResNets
# ----------------------------------------------------------------------------------------------------


def _shared_checkpoint(name):
    root = Path(os.environ.get("PATHSALIENCY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    path = root / "models" / f"cifar10-{name}.th"
    if not path.is_file():
        msg = f"{path} missing (set PATHSALIENCY_SHARED to the shared folder)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_pretrained_cifar_resnets_are_supported_with_a_finite_log10_path_norm(name, assert_untouched):
    model = load_cifar_resnet(name, checkpoint=_shared_checkpoint(name))
    with assert_untouched(model):
        r32 = path_norm(model, (3, 32, 32))
        r64 = path_norm(model, (3, 32, 32), dtype=torch.float64)
    print(f"CIFAR-10 {name}: log10 path-norm {r64.log10:.6f}")
    assert math.isfinite(r64.log10) and r64.value > 0
    assert r32.log10 == pytest.approx(r64.log10, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Output selection
# ----------------------------------------------------------------------------------------------------


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.aux = nn.Linear(4, 2)

    def features(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1), 1)


class TupleNet(Body):
    def forward(self, x):
        f = self.features(x)
        return self.fc(f), self.aux(f)


class DictNet(Body):
    def forward(self, x):
        f = self.features(x)
        return {"logits": self.fc(f), "aux": self.aux(f)}


class MainOnly(Body):
    def forward(self, x):
        return self.fc(self.features(x))


class AuxOnly(Body):
    def forward(self, x):
        return self.aux(self.features(x))


def _same_weights(cls, src):
    out = cls()
    out.load_state_dict(src.state_dict())
    return out.eval()


def test_multi_output_models_need_output_and_then_equal_the_single_output_model(assert_untouched):
    torch.manual_seed(0)
    shape = (3, 6, 6)
    tup, dic = TupleNet().eval(), DictNet().eval()
    dic.load_state_dict(tup.state_dict())
    main, aux = _same_weights(MainOnly, tup), _same_weights(AuxOnly, tup)
    pruned = copy.deepcopy(tup)
    with torch.no_grad():
        pruned.fc.weight[0] = 0
    pruned_main = _same_weights(MainOnly, pruned)
    with assert_untouched(tup, dic, pruned):
        for model in (tup, dic):
            with pytest.raises(UnsupportedModelError, match="output="):
                path_norm(model, shape)
            with pytest.raises(UnsupportedModelError, match="output="):
                path_metric(model, model, shape)
        want_main = path_norm(main, shape, dtype=torch.float64).value
        want_aux = path_norm(aux, shape, dtype=torch.float64).value
        assert path_norm(tup, shape, output=0, dtype=torch.float64).value == pytest.approx(want_main, rel=1e-12)
        assert path_norm(tup, shape, output=1, dtype=torch.float64).value == pytest.approx(want_aux, rel=1e-12)
        assert path_norm(dic, shape, output="logits", dtype=torch.float64).value == pytest.approx(want_main, rel=1e-12)
        assert path_norm(dic, shape, output=lambda o: o["aux"], dtype=torch.float64).value == pytest.approx(
            want_aux, rel=1e-12)
        d = path_metric(tup, pruned, shape, output=0)
        assert d.exact and d.value == pytest.approx(path_metric(main, pruned_main, shape).value, rel=1e-12)
        assert path_metric(tup, pruned, shape, output=1).value == 0.0  # the aux head did not change
        x = torch.randn(4, *shape)
        assert lipschitz_bound(tup, pruned, x, output=0).shape == (4,)
        scores = path_magnitude(tup, shape, output=0, dtype=torch.float64)
        assert set(scores) >= {"conv.weight", "fc.weight"}
        # the aux head is on no path to the selected output: no score, or a zero one
        assert "aux.weight" not in scores or float(scores["aux.weight"].abs().sum()) == 0.0
        with pytest.raises(UnsupportedModelError):
            path_norm(dic, shape, output="missing")


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 1)
        return self.fc(torch.flatten(x, 1))


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN().eval(), (3, 8, 8)


def test_wrong_input_shape_raises_path_saliency_error_naming_the_node(assert_untouched):
    model, _ = small_cnn()
    with assert_untouched(model):
        with pytest.raises(PathSaliencyError, match="node 'fc'"):
            path_norm(model, (3, 9, 9))  # the flattened size no longer fits fc
        with pytest.raises(PathSaliencyError, match="conv1"):
            path_norm(model, (5, 8, 8))  # wrong number of channels: conv1 (into which bn1 is folded) fails
        with pytest.raises(PathSaliencyError, match="node 'fc'"):
            path_metric(model, copy.deepcopy(model), (3, 9, 9))


def test_leading_batch_dimension_of_one_is_accepted(assert_untouched):
    model, shape = small_cnn()
    mlp = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with assert_untouched(model, mlp):
        assert path_norm(model, (1,) + shape).value == path_norm(model, shape).value
        assert path_norm(model, torch.Size((1,) + shape)).value == path_norm(model, shape).value
        assert path_metric(model, model, (1,) + shape).value == 0.0
        assert path_norm(mlp, (1, 5)).value == pytest.approx(path_norm(mlp, (5,)).value, rel=1e-7)


@pytest.mark.parametrize("param", ["conv2.weight", "bn1.running_var", "fc.bias"])
def test_nan_parameter_raises_an_error_naming_the_parameter(param, assert_untouched):
    model, shape = small_cnn()
    good = copy.deepcopy(model)
    with torch.no_grad():
        t = dict(list(model.named_parameters()) + list(model.named_buffers()))[param]
        t.view(-1)[0] = float("nan")
    with assert_untouched(model, good):
        with pytest.raises(PathSaliencyError, match=re.escape(param)):
            path_norm(model, shape)
        with pytest.raises(PathSaliencyError, match=re.escape(param)):
            path_metric(good, model, shape)  # NaN in the other parameter vector
        with pytest.raises(PathSaliencyError, match=re.escape(param)):
            path_magnitude(model, shape)
    with torch.no_grad():
        t.view(-1)[0] = float("inf")
    with pytest.raises(PathSaliencyError, match=re.escape(param)):
        path_norm(model, shape)


def test_model_on_the_meta_device_raises_path_saliency_error(assert_untouched):
    with torch.device("meta"):
        model = SmallCNN().eval()
    with assert_untouched(model):
        with pytest.raises(PathSaliencyError, match="meta"):
            path_norm(model, (3, 8, 8))
    real, shape = small_cnn()
    with pytest.raises(PathSaliencyError):
        path_metric(real, model, shape)


class OtherCNN(SmallCNN):
    def forward(self, x):  # same parameters, a different graph (no ReLU after conv2, avg-pool)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(self.conv2(x), 1)
        return self.fc(torch.flatten(x, 1))


def test_other_with_a_different_architecture_or_shapes_raises_architecture_mismatch(assert_untouched):
    model, shape = small_cnn()
    other_graph = OtherCNN().eval()
    wider = copy.deepcopy(model)
    wider.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    wider.fc = nn.Linear(6 * 4 * 4, 3)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with assert_untouched(model, other_graph, wider, mlp):
        for other in (other_graph, wider, mlp, wider.state_dict()):
            with pytest.raises(ArchitectureMismatchError):
                path_metric(model, other, shape)
        missing = {k: v for k, v in model.state_dict().items() if k != "conv2.weight"}
        with pytest.raises(ArchitectureMismatchError, match="conv2.weight"):
            path_metric(model, missing, shape)
        with pytest.raises(ArchitectureMismatchError):
            lipschitz_bound(model, wider, torch.randn(2, *shape))


def test_batchnorm_without_running_statistics_is_unsupported(assert_untouched):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    with assert_untouched(model):
        with pytest.raises(UnsupportedModelError, match="running statistics") as info:
            path_norm(model, (3, 6, 6))
    assert info.value.offenders[0][0] == "_1"


class Refused(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 4)
        self.lin2 = nn.Linear(4, 4)
        self.act = {"ReLU6": nn.ReLU6(), "GELU": nn.GELU(), "LayerNorm": nn.LayerNorm(4),
                    "GroupNorm": nn.GroupNorm(2, 4)}.get(kind, nn.Identity())

    def forward(self, x):
        h = self.lin(x)
        if self.kind == "sigmoid":
            h = torch.sigmoid(h)
        elif self.kind == "x*y":
            h = h * self.lin2(x)
        elif self.kind == "subtraction":
            h = h - self.lin2(x)
        elif self.kind == "GroupNorm":
            h = self.act(h.unsqueeze(-1)).squeeze(-1)
        else:
            h = self.act(h)
        return self.lin2(F.relu(h))


REFUSED = {  # kind -> (node name, operator as the error names it)
    "ReLU6": ("act", "ReLU6 module 'act'"),
    "GELU": ("act", "GELU module 'act'"),
    "LayerNorm": ("act", "LayerNorm module 'act'"),
    "GroupNorm": ("act", "GroupNorm module 'act'"),
    "sigmoid": ("sigmoid", "sigmoid"),
    "x*y": ("mul", "mul"),
    "subtraction": ("sub", "sub"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_non_relu_dag_operators_are_refused_with_the_node_named(kind, assert_untouched):
    model = Refused(kind).eval()
    node, op = REFUSED[kind]
    with assert_untouched(model):
        with pytest.raises(UnsupportedModelError) as info:
            path_norm(model, (4,))
    msg = str(info.value)
    assert len(info.value.offenders) == 1, msg
    name, operator, reason = info.value.offenders[0]
    assert name == node and op in operator, info.value.offenders
    assert f"node '{node}'" in msg and operator in msg and reason in msg


def test_path_magnitude_refuses_a_module_called_twice_along_one_path(assert_untouched):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(F.relu(self.lin(x)))

    model = Twice().eval()
    with assert_untouched(model):
        assert math.isfinite(path_norm(model, (3,)).log10)
        with pytest.raises(PathSaliencyError, match="lin"):
            path_magnitude(model, (3,))


# ----------------------------------------------------------------------------------------------------
# The user's model is never touched: training mode, hooks, parameters
# ----------------------------------------------------------------------------------------------------


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if self.training:  # the library must take the inference branch without switching the flag
            x = x * 1.0
        h = self.drop(F.adaptive_avg_pool2d(self.stem(x), 1).flatten(1))
        return self.fc(h)


def _hooked_pair(calls):
    torch.manual_seed(0)
    model = Hooked()
    model.train()
    model.register_forward_hook(lambda m, i, o: calls.append("root forward"))
    model.register_forward_pre_hook(lambda m, i: calls.append("root pre"))
    model.stem.register_forward_hook(lambda m, i, o: calls.append("stem (container) forward"))
    model.stem.register_forward_pre_hook(lambda m, i: calls.append("stem (container) pre"))
    model.stem[0].register_forward_hook(lambda m, i, o: calls.append("conv forward"))
    model.fc.register_full_backward_hook(lambda m, gi, go: calls.append("fc backward"))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.weight[0, 0] = 0.0
    return model, other


CALLS = {
    "path_norm": lambda m, o, shape, x: path_norm(m, shape),
    "path_metric": lambda m, o, shape, x: path_metric(m, o, shape),
    "path_metric (state dict)": lambda m, o, shape, x: path_metric(m, o.state_dict(), shape),
    "lipschitz_bound": lambda m, o, shape, x: lipschitz_bound(m, o, x),
    "path_magnitude": lambda m, o, shape, x: path_magnitude(m, shape),
    "random_rescale": lambda m, o, shape, x: random_rescale(m),
}


@pytest.mark.parametrize("fn", list(CALLS))
def test_model_in_training_mode_stays_in_training_mode_and_its_hooks_are_never_called(fn, assert_untouched):
    calls = []
    model, other = _hooked_pair(calls)  # fresh models: nothing cached from another call
    shape = (3, 6, 6)
    x = torch.randn(2, *shape)
    with assert_untouched(model, other):
        CALLS[fn](model, other, shape, x)
        CALLS[fn](model, other, shape, x)  # and again, from the library's caches
    assert model.training and all(m.training for m in model.modules())
    assert other.training and all(m.training for m in other.modules())
    assert int(model.stem[1].num_batches_tracked) == 0
    assert not calls, f"{fn} called the user's hooks: {calls}"


def test_an_activation_logging_hook_on_a_container_does_not_make_a_supported_model_unsupported(assert_untouched):
    """A common hook (log a statistic of a block's output) must not reach the library's tracer."""
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Linear(4, 2)).eval()
    plain = copy.deepcopy(model)
    log = []
    model[0].register_forward_hook(lambda m, i, o: log.append(float(o.abs().mean())))
    with assert_untouched(model):
        r = path_norm(model, (3,))
    assert r.value == path_norm(plain, (3,)).value
    assert log == []
