"""``robustness_report`` (MATH.md section 7) on the pretrained CIFAR ResNet-20 and the packaged sample.

The pruned model is a dominated pair (case 1: exact distance), the 4-bit model is not (case 2: upper
bound); in both, every observed deviation stays below its certified bound. An activation-quantized
stand-in is reported apart (measured, not certified); a broken certificate raises instead of printing.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import pathsaliency
from pathsaliency import PathMetric, PathSaliencyError, path_metric
from pathsaliency.cli import main
from pathsaliency.models.cifar_resnet import load_cifar_resnet
from pathsaliency.report import CertificateViolation, LayerDistance, RobustnessReport, robustness_report

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
SHAPE = (3, 32, 32)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def reference():
    return load_cifar_resnet("resnet20").eval()


@pytest.fixture(scope="module")
def sample():
    from pathsaliency.recipes.cifar10 import cifar10

    ds = cifar10("test", source="sample", limit=64)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    return x, y


@pytest.fixture(scope="module")
def loader(sample):
    return DataLoader(TensorDataset(*sample), batch_size=32)


def _prune(model, fraction=0.3, only=None):
    """Zero the ``fraction`` smallest weights of every conv/linear weight (of the modules in ``only``)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() > 1 and (only is None or name.rsplit(".", 1)[0] in only):
                k = int(fraction * p.numel())
                p[p.abs() <= p.abs().flatten().kthvalue(k).values] = 0
    return out


def _quantize(model, bits=4, only=None):
    """Per-tensor symmetric uniform rounding of every conv/linear weight (of the modules in ``only``)."""
    out = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() > 1 and (only is None or name.rsplit(".", 1)[0] in only):
                step = p.abs().max() / levels
                p.copy_(torch.round(p / step).clamp(-levels - 1, levels) * step)
    return out


@pytest.fixture(scope="module")
def ref_logits(reference, sample):
    with torch.no_grad():
        return reference(sample[0])


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _deviations(ref_logits, logits):
    return (ref_logits.double() - logits.double()).abs().sum(1)


class ActQuantized(nn.Module):
    """A stand-in for an NNCF/INC model that also quantizes activations: its input and its logits are
    rounded to a grid (the weights are those of ``net``)."""

    def __init__(self, net, step=1 / 8):
        super().__init__()
        self.net, self.step = copy.deepcopy(net), step

    def forward(self, x):
        x = torch.round(x / self.step) * self.step
        return torch.round(self.net(x) / self.step) * self.step


@pytest.fixture(scope="module")
def quantized_case(reference):
    """The 4-bit model and its path-metric to the reference."""
    model = _quantize(reference)
    return model, path_metric(reference, model, SHAPE)


@pytest.fixture(scope="module")
def per_layer_case(reference, loader):
    """conv1 quantized, layer3.2.conv2 and linear pruned, a running variance of layer2.0.bn1 changed."""
    model = _prune(_quantize(reference, only={"conv1"}), only={"layer3.2.conv2", "linear"})
    with torch.no_grad():
        model.layer2[0].bn1.running_var.mul_(1.5)
    report = robustness_report(reference, model, loader, name="mixed")
    return model, report


# ------------------------------------------------------------------------------------------ the certificate

def test_pruned_is_exact_and_observed_below_certified(reference, sample, ref_logits, loader, assert_untouched):
    x, y = sample
    pruned = _prune(reference)
    with assert_untouched(reference, pruned):
        report = robustness_report(reference, pruned, loader, per_layer=False, name="pruned")
    metric = path_metric(reference, pruned, SHAPE)
    assert report.exact is True and metric.exact
    assert report.log10_distance == pytest.approx(metric.log10, rel=1e-12)
    assert report.log10_path_norm == pytest.approx(metric.norm.log10, rel=1e-12)
    assert 0 < report.relative_distance < 1
    assert report.num_samples == len(x) and report.input_shape == list(SHAPE)
    assert report.input_bound == pytest.approx(max(1.0, float(x.abs().max())))
    assert report.certified_bound == pytest.approx(report.input_bound * report.distance, rel=1e-12)
    logits = _logits(pruned, x)
    dev = _deviations(ref_logits, logits)
    assert report.observed_max == pytest.approx(float(dev.max()), rel=1e-9)
    assert report.observed_mean == pytest.approx(float(dev.mean()), rel=1e-9)
    assert 0 < report.observed_max <= report.certified_bound
    assert 0 < report.observed_to_certified <= 1
    ref_pred, new_pred = ref_logits.argmax(1), logits.argmax(1)
    assert report.agreement == pytest.approx(100.0 * float((ref_pred == new_pred).double().mean()))
    assert report.accuracy_reference == pytest.approx(100.0 * float((ref_pred == y).double().mean()))
    assert report.accuracy_compressed == pytest.approx(100.0 * float((new_pred == y).double().mean()))
    assert report.accuracy_reference > 60
    assert report.layers is None and report.full_model is False and report.activations_quantized is False


def test_quantized_is_an_upper_bound(reference, sample, ref_logits, quantized_case, assert_untouched):
    x, _ = sample
    quantized = copy.deepcopy(quantized_case[0]).train()  # a training-mode model is evaluated in eval mode, flag restored
    with assert_untouched(reference, quantized):
        report = robustness_report(reference, quantized, x, per_layer=False, progress=True)
    assert quantized.training and all(m.training for m in quantized.modules())
    assert report.exact is False and quantized_case[1].exact is False
    assert report.log10_distance == pytest.approx(quantized_case[1].log10, rel=1e-12)
    assert 0 < report.observed_max <= report.certified_bound
    dev = _deviations(ref_logits, _logits(quantized.eval(), x))
    quantized.train()
    assert report.observed_max == pytest.approx(float(dev.max()), rel=1e-9)
    assert report.accuracy_reference is None and report.accuracy_compressed is None  # no labels
    assert report.agreement is not None


def test_activation_quantized_model_is_reported_apart(reference, sample, ref_logits, quantized_case, loader,
                                                     assert_untouched):
    weights, metric = quantized_case
    effective = {k: v.detach().clone() for k, v in weights.named_parameters()}  # parameters only
    full = ActQuantized(weights).eval()
    with assert_untouched(reference, full):
        report = robustness_report(reference, full, loader, effective_weights=effective, per_layer=False)
    assert report.activations_quantized is True and report.full_model is True
    assert report.exact is False
    assert report.log10_distance == pytest.approx(metric.log10, rel=1e-12)  # buffers come from the reference
    x = sample[0]
    assert report.observed_max == pytest.approx(float(_deviations(ref_logits, _logits(weights, x)).max()), rel=1e-9)
    assert report.full_observed_max == pytest.approx(float(_deviations(ref_logits, _logits(full, x)).max()), rel=1e-9)
    assert report.full_observed_max != report.observed_max
    assert report.full_agreement is not None and report.full_accuracy is not None
    text = report.to_markdown()
    assert "NOT certified" in text and "NOT covered by the certificate" in text
    assert f"{report.full_observed_max:.6g}" in text

    # the same effective weights with a plain same-architecture compressed model: no activation quantization
    plain = robustness_report(reference, weights, sample[0][:16], effective_weights=effective, per_layer=False)
    assert plain.activations_quantized is False and plain.full_model is True
    assert plain.full_observed_max == pytest.approx(plain.observed_max, rel=1e-6)
    assert "NOT covered" not in plain.to_markdown()
    with pytest.raises(ValueError, match="effective_weights"):
        robustness_report(reference, weights, loader, activations_quantized=True)


def test_broken_certificate_raises(reference, loader, monkeypatch):
    pruned = _prune(reference)
    real = path_metric

    def tiny(*args, **kwargs):
        d = real(*args, **kwargs)
        return PathMetric(d.log2 - 80, d.exact, d.log2_norm)  # D / 2**80: far below the observed deviation

    monkeypatch.setattr(pathsaliency.report, "path_metric", tiny)
    with pytest.raises(CertificateViolation, match="BUG") as info:
        robustness_report(reference, pruned, loader, per_layer=False)
    assert isinstance(info.value, AssertionError) and isinstance(info.value, PathSaliencyError)


def test_identical_models_give_zero(reference, sample):
    x, _ = sample
    report = robustness_report(reference, copy.deepcopy(reference), x[:20])
    assert report.distance == 0 and report.log10_distance == -math.inf and report.exact
    assert report.observed_max == 0 and report.certified_bound == 0
    assert report.layers == [] and len(report.unchanged_layers) == 20
    assert RobustnessReport.from_json(report.to_json()) == report
    report.to_markdown()


# ------------------------------------------------------------------------------------------ per layer

def test_per_layer_breakdown(reference, per_layer_case):
    model, report = per_layer_case
    names = [layer.name for layer in report.layers]
    assert names == ["conv1", "layer2.0.conv1", "layer3.2.conv2", "linear"]
    assert len(report.unchanged_layers) == 16 and "layer1.0.conv1" in report.unchanged_layers
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["layer2.0.conv1"].tensors == ["layer2.0.bn1.running_var"]  # batch-norm folded into its conv
    assert by_name["conv1"].exact is False and by_name["layer3.2.conv2"].exact and by_name["linear"].exact
    for layer in report.layers:
        assert layer.distance > 0 and 0 < layer.changed <= layer.numel
        assert layer.relative == pytest.approx(layer.distance / report.path_norm, rel=1e-9)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state["linear.weight"] = model.linear.weight.detach()
    assert by_name["linear"].log10_distance == pytest.approx(path_metric(reference, state, SHAPE).log10, rel=1e-12)
    assert report.observed_max <= report.certified_bound


def test_json_round_trip(per_layer_case):
    _, report = per_layer_case
    text = report.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = RobustnessReport.from_json(text)
    assert back == report and isinstance(back.layers[0], LayerDistance)
    assert back.to_json() == text
    huge = dataclasses.replace(report, distance=math.inf, certified_bound=math.inf, path_norm=math.inf,
                               layers=[dataclasses.replace(report.layers[0], distance=math.inf)])
    text = huge.to_json()
    assert '"inf"' in text and "Infinity" not in text
    assert RobustnessReport.from_json(text) == huge
    huge.to_markdown()
    with pytest.raises(ValueError):
        RobustnessReport.from_json(json.dumps({**json.loads(text), "bogus": 1}))


def test_markdown_holds_the_key_figures(per_layer_case):
    _, report = per_layer_case
    text = report.to_markdown()
    assert str(report) == text
    for figure in (f"{report.log10_path_norm:.6f}", f"{report.distance:.6g}", f"{report.relative_distance:.6g}",
                   f"{report.input_bound:.6g}", f"{report.certified_bound:.6g}", f"{report.observed_max:.6g}",
                   f"{report.observed_mean:.6g}", f"{report.agreement:.2f}%", f"{report.accuracy_reference:.2f}%"):
        assert figure in text, figure
    assert "certified upper bound" in text and "weight changes only" in text
    assert "layer3.2.conv2" in text and "NOT certified" not in text


def test_plot_writes_a_png(per_layer_case, tmp_path):
    _, report = per_layer_case
    for i, rep in enumerate((report, dataclasses.replace(report, layers=None))):
        path = tmp_path / f"r{i}.png"
        rep.plot(path)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_bad_input(reference, sample):
    x, _ = sample
    with pytest.raises(PathSaliencyError, match="shape"):
        robustness_report(reference, reference, x[:4], input_shape=(3, 30, 30))
    with pytest.raises(ValueError, match="no batch"):
        robustness_report(reference, reference, [])
    with pytest.raises(PathSaliencyError, match="bogus"):
        robustness_report(reference, None, x[:4], effective_weights={"bogus": torch.zeros(1)})


# ------------------------------------------------------------------------------------------ command line

def test_cli_report_end_to_end(reference, sample, tmp_path, capsys):
    pruned = _prune(reference, only={"layer3.2.conv2", "linear"})
    ckpt = tmp_path / "pruned.pt"
    torch.save(pruned.state_dict(), ckpt)
    data = tmp_path / "xy.pt"
    torch.save((sample[0][:40].clone(), sample[1][:40].clone()), data)
    out = tmp_path / "out"
    assert main(["report", "cifar:resnet20", str(ckpt), "--data", str(data), "--max-batches", "1",
                 "--out", str(out), "--json"]) == 0
    printed = RobustnessReport.from_json(capsys.readouterr().out)
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).stat().st_size > 0
    saved = RobustnessReport.from_json((out / "report.json").read_text())
    assert saved == printed and saved.num_samples == 40 and saved.exact
    assert [layer.name for layer in saved.layers] == ["layer3.2.conv2", "linear"]
    assert saved.accuracy_reference is not None
    assert (out / "report.md").read_text(encoding="utf-8") == saved.to_markdown()

    assert "certified bound" in (out / "report.md").read_text(encoding="utf-8")


def test_cli_data_sources(sample, tmp_path):
    from pathsaliency.cli import _report_data

    data = tmp_path / "x.pt"
    torch.save(sample[0].repeat(5, 1, 1, 1)[:300].clone(), data)  # a bare tensor: batches of 250, no labels
    batches = _report_data(str(data))
    assert [len(b) for b in batches] == [250, 50]
    assert all(torch.is_tensor(b) for b in batches)
    loader = _report_data("cifar10-sample")
    assert loader.batch_size == 250 and len(loader.dataset) == 1000


def test_cli_bad_input(reference, tmp_path, capsys):
    ckpt = tmp_path / "ok.pt"
    torch.save(reference.state_dict(), ckpt)
    assert main(["report", "cifar:resnet20", str(ckpt), "--data", "nowhere"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["report", "cifar:resnet20", str(tmp_path / "missing.pt"), "--data", "cifar10-sample"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.save({"linear.weight": torch.zeros(10, 64)}, wrong)
    assert main(["report", "cifar:resnet20", str(wrong), "--data", "cifar10-sample"]) == 2
    assert "not a state dict" in capsys.readouterr().err
    bad_data = tmp_path / "labels.pt"
    torch.save(torch.arange(5), bad_data)
    assert main(["report", "cifar:resnet20", str(ckpt), "--data", str(bad_data)]) == 2
    assert "floating-point" in capsys.readouterr().err
