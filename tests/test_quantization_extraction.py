"""Proof tests: effective (dequantized) weights reproduce the quantized models.

For NNCF and INC we load the extracted weights into the float architecture and
compare with the quantized model computing without activation quantization
(for weight-only RTN: with the quantized model itself).  The agreement must be
at float32 rounding level, which proves that the certificate computed from the
effective weights is about the network the quantized model runs.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

REL_TOL = 1e-5


def _bn_cnn(linear_bn: bool = False) -> nn.Module:
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
    ]
    if linear_bn:
        layers += [nn.Linear(8 * 14 * 14, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)]
    else:
        layers += [nn.Linear(8 * 14 * 14, 10)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None).eval()


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), f"reference {k} was modified"


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(1.0, a.abs().max().item())


def _check_weights_dict(weights: dict, reference: nn.Module) -> None:
    """Parameters (effective) + floating buffers (the reference's), float32, detached."""
    tensors = dict(reference.named_parameters())
    buffers = {k: b for k, b in reference.named_buffers() if torch.is_floating_point(b)}
    tensors.update(buffers)
    assert set(weights) == set(tensors)
    for k, v in weights.items():
        assert v.dtype == torch.float32 and v.shape == tensors[k].shape and not v.requires_grad
        if k in buffers:
            assert torch.equal(v, buffers[k])


def _assert_certificate(model: nn.Module, weights: dict, no_act: nn.Module, shape) -> None:
    """End to end with the core: the extracted weights certify the quantized-weight network."""
    import pathsaliency

    if not hasattr(pathsaliency, "path_metric"):
        pytest.skip("pathsaliency.path_metric not available")
    metric = pathsaliency.path_metric(model, weights, tuple(shape[1:]))  # per-sample shape
    x = 3 * torch.randn(*shape)
    with torch.no_grad():
        lhs = (no_act(x) - model(x)).abs().flatten(1).sum(1).double()
    rhs = x.abs().flatten(1).amax(1).clamp_min(1).double() * metric.value
    assert metric.value > 0 and bool(torch.all(lhs <= rhs))


# ----------------------------------------------------------------------------------------------
# NNCF
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pnncf():
    pytest.importorskip("nncf")
    from pathsaliency.integrations import nncf as module

    return module


def _nncf_case(pnncf, model, shape, calibration, **kwargs):
    snapshot = _snapshot(model)
    quantized = pnncf.quantize_int8(model, calibration, **kwargs)
    _assert_unchanged(model, snapshot)
    weights = pnncf.effective_weights(quantized, model)
    _check_weights_dict(weights, model)
    # name-based and traced weight location agree
    example = torch.randn(*shape)
    assert pnncf.weight_quantizer_map(quantized) == pnncf.weight_quantizer_map(quantized, example)
    traced = pnncf.effective_weights(quantized, model, example_input=example)
    assert all(torch.equal(weights[k], traced[k]) for k in weights)

    no_act = pnncf.disable_activation_quantizers(quantized)
    rebuilt = pnncf.load_effective_weights(model, weights)
    x = torch.randn(*shape)
    with torch.no_grad():
        out_q, out_no_act, out_rebuilt = quantized(x), no_act(x), rebuilt(x)
    diff = _max_rel_diff(out_no_act, out_rebuilt)
    print(f"NNCF {type(model).__name__}: max |no-act-quant - float(eff)| rel = {diff:.3g}, "
          f"max |quant - no-act-quant| = {(out_q - out_no_act).abs().max().item():.3g}")
    assert diff < REL_TOL
    assert not torch.equal(out_q, out_no_act)  # activation quantizers were really switched off
    _assert_unchanged(model, snapshot)

    # every quantized weight moved, nothing but NNCF's changes moved
    ref = dict(model.named_parameters())
    quantized_names = set(pnncf.weight_quantizer_map(quantized))
    assert quantized_names
    q_params = dict(quantized.named_parameters())
    for name in ref:
        value = weights[name]
        if name in quantized_names:
            assert not torch.equal(value, ref[name]), name
        else:  # copied from the quantized model (fast bias correction may have moved biases)
            assert torch.equal(value, q_params[name].detach()), name
    return quantized, weights


def test_nncf_small_bn_cnn_dataloader(pnncf):
    torch.manual_seed(0)
    model = _bn_cnn()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # (x, y) batches
    quantized, weights = _nncf_case(pnncf, model, (2, 3, 16, 16), loader, subset_size=16)
    assert isinstance(quantized, pnncf.HookSafeSequential)
    _assert_certificate(model, weights, pnncf.disable_activation_quantizers(quantized), (2, 3, 16, 16))
    assert type(model) is nn.Sequential


def test_nncf_resnet18(pnncf):
    torch.manual_seed(0)
    model = _resnet18()
    calibration = [torch.randn(1, 3, 64, 64) for _ in range(8)]
    quantized, _ = _nncf_case(pnncf, model, (1, 3, 64, 64), calibration, subset_size=8)
    # 20 convolutions + fc carry weight quantizers
    assert len(pnncf.weight_quantizer_map(quantized)) == 21


class _MatmulNet(nn.Module):
    """A functional ``x @ W`` weight: only NNCF's traced graph can locate it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 14 * 14, 10)
        self.W = nn.Parameter(torch.randn(10, 5))

    def forward(self, x):
        return torch.relu(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))) @ self.W


def test_nncf_traced_mapping_and_native_strip(pnncf):
    import nncf
    from nncf.parameters import StripFormat

    torch.manual_seed(0)
    model = _MatmulNet().eval()
    calibration = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    quantized = pnncf.quantize_int8(model, calibration, subset_size=8)
    example = calibration[0]
    with pytest.raises(ValueError, match="example_input"):
        pnncf.effective_weights(quantized, model)  # op names cannot tell which tensor feeds matmul
    assert set(pnncf.weight_quantizer_map(quantized, example)) == {"conv.weight", "fc.weight", "W"}
    weights = pnncf.effective_weights(quantized, model, example_input=example)
    x = torch.randn(2, 3, 16, 16)
    rebuilt = pnncf.load_effective_weights(model, weights)
    with torch.no_grad():
        assert _max_rel_diff(pnncf.disable_activation_quantizers(quantized, example)(x), rebuilt(x)) < REL_TOL
    # after nncf.strip (torch-native FakeQuantize hooks) the same weights come out
    stripped = nncf.strip(copy.deepcopy(quantized), example_input=example, strip_format=StripFormat.NATIVE)
    weights_stripped = pnncf.effective_weights(stripped, model, example_input=example)
    assert all(torch.equal(weights[k], weights_stripped[k]) for k in weights)
    with torch.no_grad():
        assert _max_rel_diff(pnncf.disable_activation_quantizers(stripped, example)(x), rebuilt(x)) < REL_TOL


def test_nncf_rejects_unquantized_model(pnncf):
    model = _bn_cnn()
    with pytest.raises(ValueError, match="no NNCF hooks"):
        pnncf.effective_weights(model, model)


# ----------------------------------------------------------------------------------------------
# Intel Neural Compressor
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinc():
    pytest.importorskip("neural_compressor.torch")
    from pathsaliency.integrations import neural_compressor as module

    return module


def _inc_static_case(pinc, model, shape):
    snapshot = _snapshot(model)
    calibration = [torch.randn(*shape) for _ in range(8)]
    quantized = pinc.quantize_static_int8(model, calibration[0], calibration)
    _assert_unchanged(model, snapshot)
    weights = pinc.effective_weights(quantized, model)
    _check_weights_dict(weights, model)

    no_act = pinc.disable_activation_quantizers(quantized)
    rebuilt = pinc.load_effective_weights(model, weights)
    x = torch.randn(*shape)
    with torch.no_grad():
        out_q, out_no_act, out_rebuilt, out_float = quantized(x), no_act(x), rebuilt(x), model(x)
    diff = _max_rel_diff(out_no_act, out_rebuilt)
    print(f"INC static {type(model).__name__}: max |no-act-quant - float(eff)| rel = {diff:.3g}, "
          f"max |quant - float(eff)| = {(out_q - out_rebuilt).abs().max().item():.3g}, "
          f"max |quant - float| = {(out_q - out_float).abs().max().item():.3g}")
    assert diff < REL_TOL
    assert not torch.equal(out_q, out_no_act)
    # the remaining gap to the quantized model is activation quantization only: same order as
    # the quantized model's own distance to the float model
    assert (out_q - out_rebuilt).abs().max() <= 2 * (out_q - out_float).abs().max() + 1e-6
    _assert_unchanged(model, snapshot)
    return quantized, weights


def test_inc_static_bn_cnn(pinc):
    """Conv+BN2d (with and without conv bias) and Linear+BN1d are folded by PT2E and unfolded here."""
    torch.manual_seed(0)
    model = _bn_cnn(linear_bn=True)
    quantized, weights = _inc_static_case(pinc, model, (2, 3, 16, 16))
    _assert_certificate(model, weights, pinc.disable_activation_quantizers(quantized), (2, 3, 16, 16))
    ref = dict(model.named_parameters())
    for name in ("0.weight", "3.weight", "7.weight", "10.weight"):  # quantized weights moved
        assert not torch.equal(weights[name], ref[name])
    for name in ("1.weight", "1.bias", "4.weight", "4.bias", "8.weight", "8.bias"):  # batch norms kept
        assert torch.equal(weights[name], ref[name])
    # a graph from INC's own export/prepare/convert has no `example_inputs` attribute: undoing the
    # batch-norm folding then needs them explicitly
    example = quantized.example_inputs
    bare = copy.deepcopy(quantized)  # GraphModule deep copies drop extra attributes
    assert not hasattr(bare, "example_inputs")
    with pytest.raises(ValueError, match="example_inputs"):
        pinc.effective_weights(bare, model)
    again = pinc.effective_weights(bare, model, example_inputs=example)
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_inc_static_resnet18(pinc):
    torch.manual_seed(0)
    _inc_static_case(pinc, _resnet18(), (1, 3, 64, 64))


def test_inc_static_weights_match_stored_scales(pinc):
    """Effective weights = fake_quantize(w) with the per-channel scales/zero points INC stored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    calibration = [torch.randn(4, 20) for _ in range(4)]
    quantized = pinc.quantize_static_int8(model, calibration[0], calibration)
    weights = pinc.effective_weights(quantized, model)
    checked = 0
    for node in quantized.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.quantized_decomposed.quantize_per_channel.default:
            w_node, s_node, zp_node, axis, qmin, qmax, _ = node.args
            scale = quantized.get_buffer(s_node.target)
            zero_point = quantized.get_buffer(zp_node.target)
            expected = torch.fake_quantize_per_channel_affine(
                dict(model.named_parameters())[w_node.target].detach(), scale, zero_point.int(), axis, qmin, qmax
            )
            assert torch.equal(weights[w_node.target], expected)
            checked += 1
    assert checked == 2
    assert torch.equal(weights["0.bias"], model[0].bias.detach())


@pytest.mark.parametrize("bits,group_size", [(8, -1), (4, 32)])
def test_inc_rtn_mlp(pinc, bits, group_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10, bias=False))
    model.eval()
    snapshot = _snapshot(model)
    quantized = pinc.quantize_weight_only(model, bits=bits, group_size=group_size)
    _assert_unchanged(model, snapshot)
    weights = pinc.effective_weights(quantized, model)
    _check_weights_dict(weights, model)
    rebuilt = pinc.load_effective_weights(model, weights)
    x = torch.randn(8, 20)
    with torch.no_grad():
        diff = _max_rel_diff(quantized(x), rebuilt(x))
    print(f"INC RTN w{bits}g{group_size}: max |quant - float(eff)| rel = {diff:.3g}")
    assert diff < REL_TOL

    # independent dequantization from INC's stored integers, scales and zero points
    for idx in (0, 2, 4):
        layer = quantized[idx]
        params = layer.unpack()
        g_idx = torch.arange(layer.in_features) // layer.group_size
        int_w, zp, scales = params["int_weight"], params["zp"], params["scales"]
        manual = (int_w - zp[:, g_idx]).float() * scales[:, g_idx].float()
        assert torch.equal(weights[f"{idx}.weight"], manual.half().float())
        assert int_w.min() >= 0 and int_w.max() < 2**bits
    assert torch.equal(weights["0.bias"], model[0].bias.detach().half().float())
    _assert_unchanged(model, snapshot)


def test_inc_rtn_resnet18_linear_only(pinc):
    torch.manual_seed(0)
    model = _resnet18()
    snapshot = _snapshot(model)
    quantized = pinc.quantize_weight_only(model, bits=4, group_size=32)
    weights = pinc.effective_weights(quantized, model)
    ref = dict(model.named_parameters())
    changed = {k for k in ref if not torch.equal(weights[k], ref[k])}
    assert changed == {"fc.weight", "fc.bias"}  # RTN quantizes nn.Linear only
    rebuilt = pinc.load_effective_weights(model, weights)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = _max_rel_diff(quantized(x), rebuilt(x))
    assert diff < REL_TOL
    _assert_unchanged(model, snapshot)


def test_inc_rejects_unquantized_model(pinc):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no INC quantization"):
        pinc.effective_weights(copy.deepcopy(model), model)
