"""``effective_theta``: one read-back per adapter, certifying exactly what the framework's model computes.

For each kind of framework model (NNCF PTQ, ``nncf.compress_weights`` INT8 / INT4 with an INT8 backup,
NNCF pruning masks, NNCF mixed precision, INC PT2E static INT8, INC RTN):

* the certified distance of ``effective_theta(model)`` equals that of a plain copy of the reference holding
  the framework's own stripped / dequantized weights, obtained independently (NNCF's ``strip``, INC's
  stored scales and integers), to 1e-9 relative in float64;
* on real CIFAR-10 images the weights-only network (the framework's model without activation
  quantization) never leaves its per-sample certified bound ``max(1, ||x||_inf) * D``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

nncf = pytest.importorskip("nncf")
pytest.importorskip("neural_compressor.torch")

import pathsaliency as ps  # noqa: E402
from pathsaliency.integrations import neural_compressor as pinc  # noqa: E402
from pathsaliency.integrations import nncf as pn  # noqa: E402
from pathsaliency.integrations._precision import choose_float_layers, weight_size_bits  # noqa: E402
from pathsaliency.models.cifar_resnet import load_cifar_resnet  # noqa: E402

SHAPE = (3, 32, 32)
REL = 1e-9


@pytest.fixture(scope="module")
def resnet20():
    return load_cifar_resnet("resnet20").eval()


@pytest.fixture(scope="module")
def images():
    """256 CIFAR-10 test images (the shared zip when present, else the packaged sample)."""
    from pathsaliency.recipes.cifar10 import cifar10
    from pathsaliency.recipes.common import as_tensors

    X, _ = as_tensors(cifar10("test", limit=256), batch_size=256)
    assert X.shape == (256, *SHAPE)
    return X


def _plain(reference: nn.Module, state: dict) -> nn.Module:
    """A plain copy of ``reference`` holding ``state``'s tensors of the reference's names, in float64."""
    plain = copy.deepcopy(reference).double()
    names = set(plain.state_dict())
    plain.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items() if k in names})
    return plain


def _same_distance(reference, theta, plain):
    a = ps.path_metric(reference, theta, SHAPE, dtype=torch.float64)
    b = ps.path_metric(reference, plain, SHAPE, dtype=torch.float64)
    assert a.log2 > -math.inf
    assert abs(a.value - b.value) <= REL * b.value, (a, b)
    return a


def _bound_holds(reference, theta, weights_only, X):
    with torch.no_grad():  # batches of 32: the size INC's PT2E graphs are exported with
        out = torch.cat([weights_only(x) for x in X.split(32)])
        observed = (reference(X) - out).abs().flatten(1).sum(1).double()
    bound = ps.lipschitz_bound(reference, theta, X)
    assert bool(torch.all(observed <= bound * (1 + 1e-6))), float((observed / bound).max())
    assert float(observed.max()) > 0  # the weights really changed


# ----------------------------------------------------------------------------------------------
# NNCF
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nncf_ptq(resnet20, images):
    return pn.quantize_int8(resnet20, [images[i:i + 1] for i in range(32)], subset_size=32)


def test_nncf_ptq(resnet20, images, nncf_ptq, assert_untouched):
    with assert_untouched(resnet20, nncf_ptq):
        theta = pn.effective_theta(nncf_ptq, resnet20)
    # NNCF's own strip writes the (narrow-range) quantized weights into the parameters
    stripped = nncf.strip(nncf_ptq, do_copy=True, example_input=images[:1], strip_format=nncf.StripFormat.NATIVE)
    _same_distance(resnet20, theta, _plain(resnet20, stripped.state_dict()))
    _bound_holds(resnet20, theta, pn.disable_activation_quantizers(nncf_ptq), images)


@pytest.mark.parametrize("mode", ["INT8_ASYM", "INT4_SYM"])
def test_nncf_compress_weights(resnet20, images, mode, assert_untouched):
    kwargs = {"group_size": 16, "all_layers": True} if mode == "INT4_SYM" else {}
    with assert_untouched(resnet20):
        compressed = pn.compress_weights(resnet20, [images[:1]], getattr(nncf.CompressWeightsMode, mode), **kwargs)
    # every conv and the linear layer carry a decompressor (INT4: the linear, convs on the INT8 backup)
    hooked = pn.weight_quantizer_map(compressed)
    assert set(hooked) == {n for n, m in resnet20.named_parameters() if n.endswith("weight") and m.dim() > 1}
    with pytest.raises(ps.PathSaliencyError, match="effective_theta"):
        ps.path_metric(resnet20, compressed, SHAPE)  # the core never reads the integer storage as weights
    theta = pn.effective_theta(compressed, resnet20)
    stripped = nncf.strip(compressed, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)
    _same_distance(resnet20, theta, _plain(resnet20, stripped.state_dict()))
    _bound_holds(resnet20, theta, compressed, images)  # no activation quantization: the model itself


def test_nncf_pruned_after_batch_norm_adaptation(resnet20, images, assert_untouched):
    pruned = pn.prune(resnet20, 0.4, SHAPE)
    nncf.batch_norm_adaptation(pruned, nncf.Dataset([images[:64]]), num_iterations=1)
    with assert_untouched(resnet20, pruned):
        theta = pn.effective_theta(pruned, resnet20)
    stripped = nncf.strip(pruned, do_copy=True, strip_format=nncf.StripFormat.IN_PLACE)
    metric = _same_distance(resnet20, theta, _plain(resnet20, stripped.state_dict()))
    assert metric.relative > 0.1  # masks and adapted statistics are read, not the dense weights
    _bound_holds(resnet20, theta, pruned, images)


def test_nncf_mixed_precision_from_the_certificate(resnet20, images, nncf_ptq, assert_untouched):
    theta_all = pn.effective_theta(nncf_ptq, resnet20)
    calibration = [images[i:i + 1] for i in range(32)]
    with assert_untouched(resnet20):
        mixed, kept = pn.quantize_mixed_int8(resnet20, calibration, SHAPE, max_size=0.4)
    layers = [n for n, m in resnet20.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kept and weight_size_bits(resnet20, kept, layers) <= 0.4 * 32 * sum(
        resnet20.get_submodule(n).weight.numel() for n in layers)
    quantized = set(pn.weight_quantizer_map(mixed))
    assert quantized and not quantized & {f"{n}.weight" for n in kept}  # the float layers stayed float
    theta = pn.effective_theta(mixed, resnet20)
    d_mixed, d_all = ps.path_metric(resnet20, theta, SHAPE), ps.path_metric(resnet20, theta_all, SHAPE)
    assert d_mixed.relative < d_all.relative
    stripped = nncf.strip(mixed, do_copy=True, example_input=images[:1], strip_format=nncf.StripFormat.NATIVE)
    _same_distance(resnet20, theta, _plain(resnet20, stripped.state_dict()))
    _bound_holds(resnet20, theta, pn.disable_activation_quantizers(mixed), images)


def test_choose_float_layers_respects_the_budget(resnet20):
    layers = [n for n, m in resnet20.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    distances = {n: float(i + 1) for i, n in enumerate(layers)}
    assert choose_float_layers(resnet20, distances, 0.25) == []
    assert choose_float_layers(resnet20, distances, 1.0) == layers
    full = 32 * sum(resnet20.get_submodule(n).weight.numel() for n in layers)
    for budget in (0.3, 0.5, 0.8):
        kept = choose_float_layers(resnet20, distances, budget)
        assert weight_size_bits(resnet20, kept, layers) <= budget * full
        # greedy by distance per weight: the densest layer is kept whenever it fits
        densest = max(layers, key=lambda n: distances[n] / resnet20.get_submodule(n).weight.numel())
        if resnet20.get_submodule(densest).weight.numel() * 24 <= budget * full - 8 * full / 32:
            assert densest in kept
    # a layer the quantization does not move (D_l = 0) never needs to stay float
    assert layers[0] not in choose_float_layers(resnet20, {**distances, layers[0]: 0.0}, 1.0)
    with pytest.raises(ValueError, match="max_size"):
        choose_float_layers(resnet20, distances, 0.1)


# ----------------------------------------------------------------------------------------------
# Intel Neural Compressor
# ----------------------------------------------------------------------------------------------


def _inc_folded_plain(reference, gm):
    """The reference in float64 whose conv weights are INC's fake-quantized folded weights (from the stored
    per-channel scales, independently of the adapter) and whose batch norms are the identity (s = 1), the
    folded bias moved into the batch norm's shift."""
    plain = copy.deepcopy(reference).double()
    params = dict(gm.named_parameters())
    pairs = [(n, n.replace("conv", "bn")) for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)]
    quantized = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.quantized_decomposed.quantize_per_channel.default:
            w_node, s_node, zp_node, axis, qmin, qmax, _ = node.args
            stored = params[w_node.target].detach()
            quantized[w_node.target] = torch.fake_quantize_per_channel_affine(
                stored, gm.get_buffer(s_node.target), gm.get_buffer(zp_node.target).int(), axis, qmin, qmax)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = plain.get_submodule(conv_name), plain.get_submodule(bn_name)
            conv.weight.copy_(quantized[f"{conv_name}.weight"].double())
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(math.sqrt(1.0 + bn.eps))
            bn.bias.copy_(params[f"{conv_name}.weight_bias"].detach().double())
        plain.linear.weight.copy_(quantized["linear.weight"].double())
        plain.linear.bias.copy_(params["linear.bias"].detach().double())
    return plain


def test_inc_static_int8(resnet20, images, assert_untouched):
    batches = [images[i:i + 32] for i in range(0, 128, 32)]
    with assert_untouched(resnet20):
        q = pinc.quantize_static_int8(resnet20, batches[0], batches)
        theta = pinc.effective_theta(q, resnet20)
    with pytest.raises(ps.PathSaliencyError, match="effective_theta"):
        ps.path_metric(resnet20, q, SHAPE)
    _same_distance(resnet20, theta, _inc_folded_plain(resnet20, q))
    _bound_holds(resnet20, theta, pinc.disable_activation_quantizers(q), images)
    # mixed precision from the certificate, as set_local overrides (autotune candidates, smallest first)
    configs = pinc.float_layer_configs(resnet20, q, SHAPE, [0.6, 0.25, 0.4])
    chosen = [pinc.keep_float_by_certificate(resnet20, q, SHAPE, size) for size in (0.25, 0.4, 0.6)]
    assert [sorted(c.local_config) for c in configs] == [sorted(k) for k in chosen]
    assert chosen[0] == [] and 0 < len(chosen[1]) <= len(chosen[2])
    # the state-dict view (batch norms unfolded in float32) certifies the same network up to that rounding
    unfolded = ps.path_metric(resnet20, pinc.effective_weights(q, resnet20), SHAPE)
    assert unfolded.relative == pytest.approx(ps.path_metric(resnet20, theta, SHAPE).relative, rel=1e-5)


def test_inc_static_refuses_calibration_batches_of_another_size_up_front(resnet20, images):
    with pytest.raises(ValueError, match=r"calibration item 1 has input shapes \(\(8, 3, 32, 32\),\).*dynamic_shapes"):
        pinc.quantize_static_int8(resnet20, images[:4], [images[:4], images[4:12]])
    batch = torch.export.Dim("batch", min=1, max=1024)
    q = pinc.quantize_static_int8(resnet20, images[:4], [images[:4], images[4:12]], dynamic_shapes=({0: batch},))
    assert math.isfinite(ps.path_metric(resnet20, pinc.effective_theta(q, resnet20), SHAPE).log2)


def test_inc_rtn_linear_only(resnet20, images, assert_untouched):
    with assert_untouched(resnet20):
        q = pinc.quantize_weight_only(resnet20, bits=4, group_size=32)
        theta = pinc.effective_theta(q, resnet20)
    layer = q.linear
    params = layer.unpack()
    g_idx = torch.arange(layer.in_features) // layer.group_size
    manual = ((params["int_weight"] - params["zp"][:, g_idx]).float() * params["scales"][:, g_idx].float()).half()
    state = {**resnet20.state_dict(), "linear.weight": manual.float(), "linear.bias": layer.bias.float()}
    _same_distance(resnet20, theta, _plain(resnet20, state))
    # INC 3.10's RTN quantizes nn.Linear only: 640 of ResNet-20's 268,336 weights
    n_weights = sum(p.numel() for n, p in resnet20.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert (resnet20.linear.weight.numel(), n_weights) == (640, 268336)
    _bound_holds(resnet20, theta, q, images)


def test_effective_theta_refuses_models_it_cannot_read(resnet20):
    with pytest.raises(ValueError, match="no NNCF hooks"):
        pn.effective_theta(copy.deepcopy(resnet20), resnet20)
    with pytest.raises(ValueError, match="no INC quantization"):
        pinc.effective_theta(copy.deepcopy(resnet20), resnet20)
