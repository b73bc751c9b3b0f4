"""Compressed models are never certified from their stored tensors. The framework objects themselves
(NNCF pruning masks, ``nncf.compress_weights``, ``nncf.quantize``, INC's ``WeightOnlyLinear``, a PT2E
q/dq graph) are refused with the adapter to call; torch's own pruning and parametrizations are read as
computed: the certified distance equals that of a plain copy holding the effective weights."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize, prune

import pathsaliency as ps
from pathsaliency import CompressedModelError

SHAPE = (3, 8, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def _net():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-1, 1)
        m.bn1.running_var.uniform_(0.5, 2)
    return m


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(4, *SHAPE)


def _refused(reference, compressed, x, match, state_dict_error=CompressedModelError):
    """Every public entry point that reads the compressed model's parameters refuses it."""
    for call in (lambda: ps.path_metric(reference, compressed, SHAPE),
                 lambda: ps.path_metric(compressed, reference, SHAPE),
                 lambda: ps.path_norm(compressed, SHAPE),
                 lambda: ps.path_magnitude(compressed, SHAPE),
                 lambda: ps.prune_unstructured(compressed, 0.5, SHAPE),
                 lambda: ps.layer_distances(reference, compressed, SHAPE),
                 lambda: ps.Theta.from_module(compressed),
                 lambda: ps.robustness_report(reference, compressed, x, per_layer=False)):
        with pytest.raises(CompressedModelError, match=match):
            call()
    with pytest.raises(state_dict_error):  # its state dict holds hook tensors, integer storage or other names
        ps.path_metric(reference, compressed.state_dict(), SHAPE)


# ------------------------------------------------------------------------------------- refused

def test_nncf_pruned_model_is_refused_not_certified_at_zero(x):
    pytest.importorskip("nncf")
    from pathsaliency.integrations import nncf as pn

    m = _net()
    pruned = pn.prune(m, 0.5, SHAPE)
    _refused(m, pruned, x, r"NNCF-wrapped model \(nncf.torch pruning masks on 'conv1'.*"
                           r"integrations.nncf.effective_theta\(model, reference\)")
    nncf = pytest.importorskip("nncf")
    stripped = nncf.strip(pruned, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)  # empty hook storage
    d = ps.path_metric(m, stripped, SHAPE)
    assert d.exact and 0 < d.relative < 1  # a plain model again: read, and no longer at distance 0


def test_nncf_compress_weights_model_is_refused_not_read_as_int8(x):
    nncf = pytest.importorskip("nncf")
    m = _net()
    compressed = nncf.compress_weights(copy.deepcopy(m), dataset=nncf.Dataset([x]))
    assert compressed.conv1.weight.dtype == torch.uint8  # what the wrong 1e10 relative distance was read from
    _refused(m, compressed, x, r"NNCF-wrapped model \(nncf.torch weight decompressors \(nncf.compress_weights\)"
                               r".*integrations.nncf.effective_theta")
    sd = {k: v for k, v in compressed.state_dict().items() if "__nncf_hooks" not in k}
    with pytest.raises(CompressedModelError, match="holds 'conv1.weight' and 2 more as torch.uint8"):
        ps.path_metric(m, sd, SHAPE)


def test_nncf_quantized_model_is_refused(x):
    nncf = pytest.importorskip("nncf")
    m = _net()
    q = nncf.quantize(copy.deepcopy(m), nncf.Dataset([x]), subset_size=1)
    _refused(m, q, x, r"NNCF-wrapped model \(nncf.torch quantizers.*integrations.nncf.effective_theta")


def test_inc_weight_only_model_is_refused(x):
    pytest.importorskip("neural_compressor")
    from pathsaliency.integrations import neural_compressor as pinc

    m = _net()
    q = pinc.quantize_weight_only(m, bits=8, group_size=-1)
    _refused(m, q, x, r"Intel Neural Compressor modules \(INCWeightOnlyLinear at 'fc'\).*"
                      r"integrations.neural_compressor.effective_theta\(model, reference\)",
             state_dict_error=ps.ArchitectureMismatchError)  # 'fc.qweight', 'fc.scales': no 'fc.weight'


def test_pt2e_quantized_graph_is_refused(x):
    pytest.importorskip("neural_compressor")
    from pathsaliency.integrations import neural_compressor as pinc

    m = _net()
    q = pinc.quantize_static_int8(m, (x,), [x])
    with pytest.raises(CompressedModelError, match=r"PT2E quantized graph \(\d+ quantize/dequantize nodes.*"
                                                   r"integrations.neural_compressor.effective_theta"):
        ps.path_metric(m, q, SHAPE)
    with pytest.raises(CompressedModelError, match="PT2E"):
        ps.robustness_report(m, q, x, per_layer=False)


# ------------------------------------------------------------------------------------- read as computed

def _plain_copy(model, weights):
    """A plain ``Net`` holding ``weights`` ({parameter name: tensor})."""
    plain = _net()
    plain.load_state_dict({k: v.detach() for k, v in model.state_dict().items() if k in plain.state_dict()},
                          strict=False)
    with torch.no_grad():
        for name, value in weights.items():
            plain.get_parameter(name).copy_(value)
    return plain


def _same_certificate(reference, compressed, plain, x):
    for a, b in ((reference, compressed), (compressed, reference)):
        got = ps.path_metric(a, b, SHAPE, dtype=torch.float64)
        want = ps.path_metric(*(plain if m is compressed else m for m in (a, b)), SHAPE, dtype=torch.float64)
        assert want.log2 > -math.inf
        assert abs(got.value - want.value) <= 1e-12 * want.value and got.exact == want.exact
    layers = ps.layer_distances(reference, compressed, SHAPE)
    assert {k: v.log2 for k, v in layers.items()} == {k: v.log2 for k, v in ps.layer_distances(reference, plain, SHAPE).items()}


def test_torch_pruned_model_is_certified_with_its_masked_weights(x, assert_untouched):
    m = _net()
    pruned = copy.deepcopy(m)
    prune.l1_unstructured(pruned.conv1, "weight", amount=0.5)
    prune.random_unstructured(pruned.fc, "weight", amount=0.3)
    prune.l1_unstructured(pruned.fc, "weight", amount=0.2)  # a PruningContainer
    with torch.no_grad():
        pruned.conv2.weight.mul_(1.1)
        pruned.conv1.weight_mask[0] = 0  # `conv1.weight` is stale until the next forward: read as computed
    plain = _plain_copy(pruned, {"conv1.weight": pruned.conv1.weight_orig * pruned.conv1.weight_mask,
                                 "fc.weight": pruned.fc.weight_orig * pruned.fc.weight_mask})
    assert not torch.equal(plain.conv1.weight, pruned.conv1.weight)
    with assert_untouched(m, pruned):
        _same_certificate(m, pruned, plain, x)
        report = ps.robustness_report(m, pruned, x, per_layer=False)
    assert report.distance == ps.path_metric(m, plain, SHAPE).value
    with torch.no_grad():  # a mask written in place after a computation: read again, not from a cache
        pruned.conv1.weight_mask[1] = 0
        plain.conv1.weight[1] = 0
    assert ps.path_metric(pruned, m, SHAPE).log2 == ps.path_metric(plain, m, SHAPE).log2


def test_parametrized_model_is_certified_with_its_computed_weights(x, assert_untouched):
    class Halved(nn.Module):
        def forward(self, w):
            return 0.5 * w

    m = _net()
    para = copy.deepcopy(m)
    parametrize.register_parametrization(para.conv2, "weight", Halved())
    parametrizations.weight_norm(para.fc, "weight")
    with torch.no_grad():
        para.fc.parametrizations.weight.original0.mul_(1.5)  # the norm g: fc.weight changes by 1.5
    plain = _plain_copy(para, {"conv2.weight": para.conv2.weight, "fc.weight": para.fc.weight})
    with assert_untouched(m, para):
        _same_certificate(m, para, plain, x)
        scores = ps.path_magnitude(para, SHAPE)
    assert set(scores) == {"conv1.weight", "conv2.weight", "fc.weight"}
