"""The observed side of a certificate: one evaluation loop (``outputs``/``evaluate``), one bound check
with one tolerance, and the report fed a ``Theta`` (what an integration reads back)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import pathsaliency as ps
from pathsaliency import evaluate as ev
from pathsaliency.bound import ABS_TOL_EPS, REL_TOL, CertificateViolation, check_bound, rounding_allowance

SHAPE = (3, 8, 8)


def _net(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                      nn.Linear(4 * 8 * 8, 5)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    return 3 * torch.randn(300, *SHAPE), torch.randint(0, 5, (300,))


@pytest.mark.parametrize("kind", ["tensor", "pair", "loader", "dataset"])
def test_outputs_are_the_models_outputs_in_eval_mode(kind, data, assert_untouched):
    x, y = data
    model = _net().train()  # evaluated in eval mode (dropout off), the flags restored
    given = {"tensor": x, "pair": (x, y), "loader": DataLoader(TensorDataset(x, y), batch_size=64),
             "dataset": TensorDataset(x, y)}[kind]
    with assert_untouched(model):
        out = ev.outputs(model, given, progress=False)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        want = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(out.outputs, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.input_bounds, x.reshape(300, -1).abs().amax(1).double().clamp_min(1.0))
    assert (out.labels is None) == (kind == "tensor")
    if out.labels is not None:
        assert torch.equal(out.labels, y)
    assert ev.outputs(model, given, max_batches=1, progress=False).outputs.shape[0] == (64 if kind == "loader" else 256)


def test_progress_bar_only_on_a_terminal_by_default(data, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    x = data[0][:10]
    for terminal, progress, shown in ((False, None, False), (True, None, True), (True, False, False),
                                      (False, True, True)):
        monkeypatch.setattr(ev, "_is_terminal", lambda: terminal)
        ev.outputs(_net(), x, progress=progress)
        assert ("evaluate" in capsys.readouterr().err) == shown, (terminal, progress)


def test_check_bound_allows_float_rounding_only():
    bound = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    check_bound(bound * (1 + REL_TOL / 2), bound)
    with pytest.raises(CertificateViolation, match="BUG.*1 of 3 samples.*sample 1"):
        check_bound(torch.tensor([1.0, 2.0 * (1 + 2 * REL_TOL), 0.0]), bound)
    with pytest.raises(CertificateViolation, match="sample 2"):
        check_bound(torch.tensor([0.0, 0.0, 1e-12]), bound)  # a zero bound allows nothing without outputs
    ref, out = torch.ones(3, 10), torch.ones(3, 10)
    allowance = rounding_allowance(ref, out)
    assert torch.equal(allowance, torch.full((3,), ABS_TOL_EPS * torch.finfo(torch.float32).eps * 20.0,
                                             dtype=torch.float64))
    check_bound(torch.tensor([0.0, 0.0, 1e-12]), bound, allowance)
    assert issubclass(CertificateViolation, ps.PathSaliencyError) and issubclass(CertificateViolation, AssertionError)
    from pathsaliency.recipes import unstructured
    from pathsaliency.report import CertificateViolation as from_report

    assert unstructured.CertificateViolation is CertificateViolation is from_report


class _Rounded(nn.Module):
    """A stand-in for a framework's model: it rounds its input (activation quantization)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


def test_report_of_a_theta_certifies_its_weights_only_model(data, assert_untouched):
    ref = _net()
    changed = ps.Theta.from_module(_net(seed=5)).layers
    theta = ps.Theta.from_folded(ref, {"5": changed["5"]})
    full = _Rounded(theta.to_module())
    with assert_untouched(ref, full):
        report = ps.robustness_report(ref, full, data, theta=theta, activations_quantized=True, progress=False)
    metric = ps.path_metric(ref, theta, SHAPE)
    assert report.log10_distance == metric.log10 and report.exact == metric.exact
    plain = ev.outputs(theta.to_module(), data[0], progress=False).outputs
    ref_out = ev.outputs(ref, data[0], progress=False).outputs
    assert report.observed_max == pytest.approx(float(ev.deviation(ref_out, plain).max()), rel=1e-9)
    assert 0 < report.observed_max <= report.certified_bound
    assert report.full_model and report.activations_quantized and report.full_observed_max != report.observed_max
    assert [layer.name for layer in report.layers] == ["5"]
    no_full = ps.robustness_report(ref, None, data[0][:20], theta=theta, per_layer=False, progress=False)
    assert not no_full.full_model and not no_full.activations_quantized
    assert no_full.log10_distance == metric.log10
    with pytest.raises(ValueError, match="not both"):
        ps.robustness_report(ref, None, data[0], theta=theta, effective_weights={})
    with pytest.raises(TypeError, match="Theta"):
        ps.robustness_report(ref, None, data[0], theta=ref.state_dict())
    assert not math.isnan(report.relative_distance)
