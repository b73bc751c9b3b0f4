"""Rescaling-invariant pruning criteria (``pathsaliency.criteria``) and the recipes' harness."""
import pytest
import torch
import torch.nn as nn

import pathsaliency as ps
from pathsaliency.criteria import INVARIANT_CRITERIA, fan_out, lamp
from pathsaliency.pruning import prunable_weights, unstructured_scores
from pathsaliency.recipes.common import reestimate_batchnorm
from pathsaliency.recipes.harness import parse, spearman


def _cnn(seed=0):
    """conv-bn-relu twice, max-pool, linear: every hidden channel is rescalable."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8),
                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 5)).eval()
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(-1, 1)
    return m


class _Residual(nn.Module):
    """A stem (conv-bn-relu), one basic block (conv-bn-relu-conv-bn plus the identity, relu), global
    average pooling, a linear layer: the block's hidden channels are rescalable, the stream is not."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        s = torch.relu(self.bn0(self.stem(x)))
        s = torch.relu(s + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(s))))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(s, 1), 1))


def _residual(seed=0):
    torch.manual_seed(seed)
    m = _Residual().eval()
    for bn in (m.bn0, m.bn1, m.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(-1, 1)
        bn.bias.data.uniform_(-1, 1)
    m.bn0.weight.data *= 0.5  # the stream's out/in ratio away from 1, as in trained ResNets (2.2-2.4)
    m.bn2.weight.data *= 0.5
    return m


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()


def test_balanced_score_is_path_magnitude_over_the_root_of_both_end_masses():
    """Independent computation on an MLP: F by explicit products of |W| on the all-ones input (biases
    included), B by the transposed products from the outputs, m = F * B per neuron (the input's B too)."""
    m = _mlp()
    W = [m[i].weight.detach().abs() for i in (0, 2, 4)]
    b = [m[i].bias.detach().abs() for i in (0, 2, 4)]
    F = [torch.ones(3, dtype=torch.float64)]
    for w, c in zip(W, b):
        F.append(w @ F[-1] + c)
    B = [torch.ones(2, dtype=torch.float64)]
    for w in reversed(W):
        B.insert(0, w.t() @ B[0])
    total = float(F[-1].sum())
    names = prunable_weights(m)
    scores = unstructured_scores(m, (3,), "balanced", names, dtype=torch.float64)
    for k, name in enumerate(names):
        p = W[k] * F[k].view(1, -1) * B[k + 1].view(-1, 1) / total
        mass_in, mass_out = F[k] * B[k] / total, F[k + 1] * B[k + 1] / total
        want = p / (mass_out.view(-1, 1) * mass_in.view(1, -1)).sqrt()
        torch.testing.assert_close(scores[name].double(), want, rtol=1e-10, atol=0)
    fan = unstructured_scores(m, (3,), "balanced-fan", names, dtype=torch.float64)
    for name in names:
        torch.testing.assert_close(fan[name], scores[name] * scores[name].shape[0] ** 0.5, rtol=1e-12, atol=0)


@pytest.mark.parametrize("criterion", INVARIANT_CRITERIA)
def test_invariant_criteria_give_identical_masks_after_a_power_of_two_rescaling(criterion, assert_untouched):
    m = _cnn()
    r = ps.random_rescale(m, generator=torch.Generator().manual_seed(1))
    calib = torch.randn(12, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    with assert_untouched(m):
        pruned, masks = ps.prune_unstructured(m, 0.6, (2, 8, 8), criterion=criterion, calibration=calib)
    _, masks_r = ps.prune_unstructured(r, 0.6, (2, 8, 8), criterion=criterion, calibration=calib)
    assert all(torch.equal(masks[k], masks_r[k]) for k in masks)
    if criterion == INVARIANT_CRITERIA[0]:
        _, mag = ps.prune_unstructured(m, 0.6, criterion="magnitude")
        _, mag_r = ps.prune_unstructured(r, 0.6, criterion="magnitude")
        assert not all(torch.equal(mag[k], mag_r[k]) for k in mag)  # the rescaling does move magnitudes
    assert sum(int((~v).sum()) for v in masks.values()) == round(0.6 * sum(v.numel() for v in masks.values()))


def test_wanda_is_weight_times_input_rms_in_the_batchnorm_gauge():
    """Independent forward on the CNN: every layer's input by hand; rows of batch-norm-followed convs and
    of the output layer are not normalised."""
    m = _cnn()
    X = torch.randn(7, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x1 = X
        x2 = torch.relu(m[1](m[0](x1)))
        x3 = torch.flatten(torch.max_pool2d(torch.relu(m[4](m[3](x2))), 2), 1)
    rms = lambda x, dims: (x.double() ** 2).mean(dims).sqrt()
    want = {"0.weight": m[0].weight.abs().double() * rms(x1, (0, 2, 3)).view(1, -1, 1, 1),
            "3.weight": m[3].weight.abs().double() * rms(x2, (0, 2, 3)).view(1, -1, 1, 1),
            "8.weight": m[8].weight.abs().double() * rms(x3, 0).view(1, -1)}
    got = unstructured_scores(m, None, "wanda", list(want), calibration=[(X[:4], 0), (X[4:], 0)])
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-5, atol=0)
    lamped = unstructured_scores(m, None, "wanda-lamp", list(want), calibration=X)
    for name in want:
        torch.testing.assert_close(lamped[name], lamp(got[name]).to(lamped[name].dtype), rtol=1e-5, atol=1e-12)


def test_wanda_normalises_the_rows_of_a_rescalable_layer_without_batchnorm():
    """MLP: the hidden layers' rows are rescaled with their bias, so each row is divided by its output's
    rms; the last layer's outputs are the network's (not rescalable)."""
    m = _mlp()
    X = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h1 = m[0](X)
        h2 = m[2](torch.relu(h1))
    rms = lambda x: (x ** 2).mean(0).sqrt()
    want = {"0.weight": m[0].weight.abs() * rms(X).view(1, -1) / rms(h1).view(-1, 1),
            "2.weight": m[2].weight.abs() * rms(torch.relu(h1)).view(1, -1) / rms(h2).view(-1, 1),
            "4.weight": m[4].weight.abs() * rms(torch.relu(h2)).view(1, -1)}
    got = unstructured_scores(m, None, "wanda", list(want), calibration=X)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w.detach(), rtol=1e-12, atol=0)
    r = ps.random_rescale(m, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(r[0].weight, m[0].weight)
    got_r = unstructured_scores(r, None, "wanda", list(want), calibration=X)
    assert all(torch.equal(got[n], got_r[n]) for n in want)  # power-of-two factors: bit-identical


def test_norm_balanced_is_magnitude_on_the_representative_with_equal_gamma_and_column_norms():
    m = _cnn()
    W3, W8 = m[3].weight.detach().abs().double(), m[8].weight.detach().abs().double()
    g1, g2 = m[1].weight.detach().abs().double(), m[4].weight.detach().abs().double()
    c1 = (g1 / W3.pow(2).sum((0, 2, 3)).sqrt()).sqrt()
    c2 = (g2 / W8.view(5, 8, 9).pow(2).sum((0, 2)).sqrt()).sqrt()  # 8 channels x 3x3 positions after the pool
    want = {"0.weight": m[0].weight.detach().abs().double(), "3.weight": W3 * c1.view(1, -1, 1, 1),
            "8.weight": W8 * c2.repeat_interleave(9).view(1, -1)}
    got = unstructured_scores(m, (2, 8, 8), "norm-balanced", list(want))
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="'0' has none: use wanda-lamp or balanced-fan"):
        unstructured_scores(_mlp(), (3,), "norm-balanced")


def test_norm_matched_puts_the_hidden_channels_at_the_out_in_ratio_of_the_stream():
    """By hand on the residual net: r from the stream's readers (conv1: 4 columns, fc: 4 columns; not the
    stem, which reads the input) and writers (bn0, bn2: 8 gammas); conv2's columns times
    sqrt(r |gamma1_j| / ||W2_:j||), every other weight as trained."""
    m = _residual()
    W = {n: p.detach().double() for n, p in m.named_parameters()}
    r = (((W["conv1.weight"] ** 2).sum() + (W["fc.weight"] ** 2).sum()) / 8
         / (((W["bn0.weight"] ** 2).sum() + (W["bn2.weight"] ** 2).sum()) / 8)).sqrt()
    assert abs(float(r) - 1) > 0.1  # the test can tell r from the balanced ratio 1
    col = W["conv2.weight"].pow(2).sum((0, 2, 3)).sqrt()
    want = {"stem.weight": W["stem.weight"].abs(), "conv1.weight": W["conv1.weight"].abs(),
            "conv2.weight": W["conv2.weight"].abs() * (r * W["bn1.weight"].abs() / col).sqrt().view(1, -1, 1, 1),
            "fc.weight": W["fc.weight"].abs()}
    got = unstructured_scores(m, (2, 8, 8), "norm-matched", list(want))
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-6, atol=0)
    from pathsaliency.criteria import stream_ratio

    assert stream_ratio(m) == pytest.approx(float(r), rel=1e-12)
    assert stream_ratio(_cnn()) == 1.0  # every hidden channel rescalable: global norm-balanced
    torch.manual_seed(0)  # pre-activation: the stem's channels are read through a batch-norm of their own
    pre = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 3), nn.Flatten(), nn.Linear(12, 2)).eval()
    assert stream_ratio(pre, default=None) is None
    nb = unstructured_scores(_cnn(), (2, 8, 8), "norm-balanced")
    assert all(torch.equal(v, unstructured_scores(_cnn(), (2, 8, 8), "norm-matched")[k]) for k, v in nb.items())


def test_norm_matched_masks_are_bit_identical_after_a_power_of_two_rescaling_of_a_residual_net(one_thread):
    m = _residual()
    r = ps.random_rescale(m, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(r.conv2.weight, m.conv2.weight)
    a = unstructured_scores(m, (2, 8, 8), "norm-matched")
    b = unstructured_scores(r, (2, 8, 8), "norm-matched")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for amount in (0.3, 0.6, 0.9):
        _, masks = ps.prune_unstructured(m, amount, (2, 8, 8), criterion="norm-matched")
        _, masks_r = ps.prune_unstructured(r, amount, (2, 8, 8), criterion="norm-matched")
        assert all(torch.equal(masks[k], masks_r[k]) for k in masks)


def test_auto_criterion_is_norm_matched_with_a_residual_stream_else_norm_balanced_lamp_on_batchnorm_networks():
    from pathsaliency.pruning import resolve_criterion

    assert resolve_criterion("auto", _residual()) == "norm-matched"
    assert resolve_criterion("auto", _cnn()) == "norm-balanced-lamp"  # no stream to read the ratio from
    assert resolve_criterion("auto", _mlp()) == "balanced-fan"  # no batch-norm: norm-balanced is undefined
    assert resolve_criterion("auto", _mlp(), calibration=torch.zeros(2, 3)) == "wanda-lamp"
    assert resolve_criterion("magnitude", _mlp()) == "magnitude"
    m = _cnn()
    _, auto = ps.prune_unstructured(m, 0.5, (2, 8, 8))
    _, named = ps.prune_unstructured(m, 0.5, (2, 8, 8), criterion="norm-balanced-lamp")
    assert all(torch.equal(auto[k], named[k]) for k in auto)


def test_data_aware_criterion_without_calibration_says_what_to_pass():
    with pytest.raises(ValueError, match="calibration="):
        ps.prune_unstructured(_cnn(), 0.5, (2, 8, 8), criterion="wanda-lamp")


def test_lamp_is_the_square_over_the_tail_sum_of_squares():
    s = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    flat = s.reshape(-1).abs()
    want = torch.tensor([float(v * v / (flat[flat >= v] ** 2).sum()) for v in flat]).view(2, 2)
    torch.testing.assert_close(lamp(s), want.double())
    assert float(lamp(s).max()) == 1.0  # the largest weight of every layer scores 1


def test_fan_out_counts_output_channels_times_kernel_positions():
    assert fan_out(nn.Conv2d(8, 16, 3, groups=2)) == 72 and fan_out(nn.Linear(64, 10)) == 10
    assert fan_out(nn.ConvTranspose2d(8, 6, 2, groups=2)) == 12  # weight (8, 3, 2, 2): 3 outputs x 4 taps


def test_unknown_criterion_is_refused_with_the_list():
    with pytest.raises(ValueError, match="balanced-fan"):
        ps.prune_unstructured(_mlp(), 0.5, (3,), criterion="balance")


def test_batchnorm_reestimation_gives_the_data_statistics_on_a_copy(assert_untouched):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).eval()
    X = torch.randn(20, 2, 6, 6) * 3 + 1
    with assert_untouched(m):
        re = reestimate_batchnorm(m, X, batch_size=20)
    y = m[0](X).detach()
    torch.testing.assert_close(re[1].running_mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(re[1].running_var, y.var((0, 2, 3), unbiased=True))
    assert not re.training and re[1].momentum == m[1].momentum


def test_spearman_against_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)  # ties: average ranks


def test_config_command_line_round_trip():
    from pathsaliency.recipes.unstructured import Config

    c = parse(Config, ["--models", "resnet20", "resnet32", "--sparsities", "0.4", "0.7", "--no-reestimate-bn",
                       "--limit", "5"], prog="x", description="")
    assert c == Config(models=("resnet20", "resnet32"), sparsities=(0.4, 0.7), reestimate_bn=False, limit=5)
    assert parse(Config, [], prog="x", description="") == Config()
