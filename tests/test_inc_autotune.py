"""INC ``autotune`` driven by the certified bound (``pathsaliency.integrations.neural_compressor``).

No validation data: the objective is ``1 - D(theta, theta') / ||Phi(theta)||_1``, the float baseline
scores 1, and autotune's ``tolerable_loss`` is the largest certified relative distance accepted. On the
pretrained CIFAR ResNet-20 autotune picks the most aggressive configuration whose certificate is within
the tolerance; a tighter tolerance keeps more layers in float (static INT8) or more bits (weight-only).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("neural_compressor")

import pathsaliency as ps  # noqa: E402
from pathsaliency.models.cifar_resnet import load_cifar_resnet  # noqa: E402
from pathsaliency.integrations import neural_compressor as pinc  # noqa: E402
from neural_compressor.torch.quantization import RTNConfig, StaticQuantConfig, TuningConfig, autotune  # noqa: E402

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    return load_cifar_resnet("resnet20").eval()


@pytest.fixture(scope="module")
def images():
    from pathsaliency.recipes.cifar10 import cifar10

    data = cifar10("test", source="sample", limit=8)
    x, _ = next(iter(torch.utils.data.DataLoader(data, batch_size=8)))
    return x


def _static(float_layers=()):
    config = StaticQuantConfig()
    for name in float_layers:
        config.set_local(name, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    return config


def _convs(model, prefix):
    return [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Conv2d)]


def test_certified_eval_fn_is_autotunes_eval_fn(resnet20, assert_untouched):
    """Baseline = 1 exactly; a quantized candidate scores 1 - D / ||Phi||, D from path_metric."""
    rtn = RTNConfig(bits=4, group_size=-1, use_layer_wise=False)
    objective = pinc.certified_eval_fn(resnet20, SHAPE)
    with assert_untouched(resnet20):
        quantized = autotune(resnet20, TuningConfig(config_set=[rtn], tolerable_loss=0.5), eval_fn=objective)
    baseline, trial = objective.history
    assert baseline.score == 1.0 and baseline.relative_distance == 0.0 and not baseline.quantized
    direct = ps.path_metric(resnet20, pinc.effective_weights(quantized, resnet20), SHAPE)
    assert trial.quantized and trial.score == 1.0 - direct.relative
    assert 0 < direct.relative < 0.5


def test_autotune_keeps_layers_in_float_until_the_certificate_is_within_tolerance(
    resnet20, images, assert_untouched
):
    example = (torch.zeros(4, *SHAPE),)  # PT2E specialises to this batch size: calibrate with it
    calibration = [images[:4], images[4:]]
    configs = [  # from the most to the least aggressive
        _static(),
        _static(_convs(resnet20, "layer3.")),
        _static(_convs(resnet20, "layer2.") + _convs(resnet20, "layer3.") + ["linear"]),
    ]

    # a tolerance nothing meets: autotune tries everything and returns the closest; we refuse it
    with assert_untouched(resnet20), pytest.raises(pinc.NoCertifiedConfigError) as info:
        pinc.autotune_certified(resnet20, configs, SHAPE, example, calibration, max_relative_distance=1e-6)
    closest = info.value.result
    distances = [r for _, r in closest.trials]
    assert [c for c, _ in closest.trials] == configs
    assert distances[0] > distances[1] > distances[2] > 0  # more layers in float, smaller certificate
    assert closest.config == configs[2] and closest.relative_distance == distances[2]
    assert not closest.within_tolerance

    # between the two most aggressive: autotune takes the second (layer3 in float)
    tolerance = math.sqrt(distances[0] * distances[1])
    with assert_untouched(resnet20):
        chosen = pinc.autotune_certified(resnet20, configs, SHAPE, example, calibration, max_relative_distance=tolerance)
    assert chosen.within_tolerance and chosen.config == configs[1]
    assert [c for c, _ in chosen.trials] == configs[:2]  # it stopped at the first accepted one
    # the certificate, recomputed directly from the chosen model's weights
    metric = ps.path_metric(resnet20, pinc.effective_theta(chosen.model, resnet20, example_inputs=example), SHAPE)
    weights = pinc.effective_weights(chosen.model, resnet20, example_inputs=example)  # unfolded, for the layers
    assert metric.relative <= tolerance
    assert metric.relative == pytest.approx(distances[1], rel=1e-9)
    # layer3 really stayed float (up to the batch-norm fold/unfold rounding), layer1 did not
    for name in _convs(resnet20, "layer3."):
        torch.testing.assert_close(weights[f"{name}.weight"], resnet20.get_parameter(f"{name}.weight"))
    assert not torch.allclose(weights["layer1.0.conv1.weight"], resnet20.layer1[0].conv1.weight)
    # and it bounds what the weights change on real images (activation quantization switched off)
    no_act = pinc.disable_activation_quantizers(chosen.model)
    with torch.no_grad():
        observed = (resnet20(images[:4]) - no_act(images[:4])).abs().sum(1).double()
    assert bool(torch.all(observed <= ps.lipschitz_bound(resnet20, weights, images[:4]) * (1 + 1e-6)))


def test_autotune_weight_only_picks_bits_by_tolerance(resnet20):
    """RTN quantizes the ResNet's linear layer (INC's weight-only white list); no activation
    quantization, so the certificate covers the whole quantized model."""
    example = torch.zeros(1, *SHAPE)
    configs = [RTNConfig(bits=b, group_size=-1, use_layer_wise=False) for b in (2, 4, 8)]
    loose = pinc.autotune_certified(resnet20, configs, SHAPE, example, max_relative_distance=0.9)
    assert loose.config == configs[0] and len(loose.trials) == 1
    assert loose.relative_distance <= 0.9

    tight = pinc.autotune_certified(resnet20, configs, SHAPE, example, max_relative_distance=0.05)
    distances = [r for _, r in tight.trials]
    assert distances[0] > distances[1] > 0.05 >= distances[2]
    assert tight.config == configs[2] and tight.within_tolerance
    x = 3 * torch.randn(16, *SHAPE)
    with torch.no_grad():  # whole-model certificate: the quantized model itself
        observed = (resnet20(x) - tight.model(x)).abs().sum(1).double()
    weights = pinc.effective_weights(tight.model, resnet20)
    assert ps.path_metric(resnet20, weights, SHAPE).relative == pytest.approx(tight.relative_distance, rel=1e-12)
    assert bool(torch.all(observed <= ps.lipschitz_bound(resnet20, weights, x) * (1 + 1e-6)))

    # nothing within tolerance: fallback="float" returns the float model (autotune's closest is in .trials)
    fallback = pinc.autotune_certified(resnet20, configs[:1], SHAPE, example, max_relative_distance=1e-3, fallback="float")
    assert fallback.within_tolerance and fallback.config is None and fallback.relative_distance == 0.0
    assert [c for c, _ in fallback.trials] == configs[:1] and fallback.trials[0][1] == distances[0]
    with torch.no_grad():
        torch.testing.assert_close(fallback.model(x), resnet20(x), rtol=0, atol=0)
