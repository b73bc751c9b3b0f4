"""The GPU path: every public function on a CUDA model equals its CPU result, float32 agrees with float64,
and the hot loops never read back to the host.

The tests marked ``cuda`` run only where a GPU is present (``pytest -m cuda tests/test_cuda.py``, which
``benchmarks/gpu.sh`` runs) and are skipped elsewhere (CI has none). Host round trips are counted with
``torch.cuda.set_sync_debug_mode("warn")`` (every ``.item()``, ``float(tensor)``, copy to or from the host,
...): a repeated call makes the same number of them on ResNet-18 and ResNet-50, and a removal pass cut
into many chunks makes as many as one cut into one chunk, so none sits in a per-layer or per-chunk loop.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import pathsaliency as ps
from pathsaliency.precision import ieee_float32

F64 = torch.float64
SHAPE = (3, 64, 64)


def cuda_test(fn):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(fn))


def _resnet(name, seed=0):
    torch.manual_seed(seed)
    m = torchvision.models.get_model(name, num_classes=10)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return m.eval()


def _pair(name="resnet18"):
    cpu = _resnet(name)
    return cpu, copy.deepcopy(cpu).cuda()


@contextlib.contextmanager
def _host_syncs():
    """Yields a list that receives the number of CUDA synchronisations made inside the block."""
    torch.cuda.synchronize()
    found = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found.append(sum("synchroniz" in str(w.message) for w in caught))


def _stream_removals(model):
    """The Removal items of the first residual-stream group of ``model`` (64 candidates), from torch-pruning."""
    tp = pytest.importorskip("torch_pruning")
    from pathsaliency.integrations.torch_pruning import group_removals

    DG = tp.DependencyGraph().build_dependency(model, torch.randn(1, *SHAPE))
    for g in DG.get_all_groups(ignored_layers=[model.fc], root_module_types=[nn.Conv2d]):
        removals = group_removals(g)
        if any(r.module == "layer1.0.conv2" for r in removals):
            return removals, len(g[0].idxs)
    raise AssertionError("no residual-stream group found")


@cuda_test
def test_every_public_function_on_cuda_equals_cpu(assert_untouched):
    cpu, gpu = _pair()
    zeroed = {k: (v * (torch.rand_like(v) > 0.3) if v.dim() > 1 else v) for k, v in cpu.state_dict().items()}
    moved = {k: v.cuda() for k, v in zeroed.items()}
    removals, num = _stream_removals(cpu)
    x = torch.randn(4, *SHAPE)
    with assert_untouched(gpu):
        for dtype in (torch.float32, F64):
            tol = 1e-5 if dtype == torch.float32 else 1e-10
            assert ps.path_norm(gpu, SHAPE, dtype=dtype).log2 == pytest.approx(
                ps.path_norm(cpu, SHAPE, dtype=dtype).log2, abs=tol)
            a, b = ps.path_magnitude(cpu, SHAPE, dtype=dtype), ps.path_magnitude(gpu, SHAPE, dtype=dtype)
            assert b.scale.log2 == pytest.approx(a.scale.log2, abs=tol)
            for k in a:
                assert b[k].device.type == "cuda"
                torch.testing.assert_close(b[k].cpu(), a[k], rtol=100 * tol, atol=tol * float(a[k].max()))
            for exact in (True, False):
                s_cpu = ps.channel_saliency(cpu, SHAPE, removals, num, exact=exact, dtype=dtype)
                s_gpu = ps.channel_saliency(gpu, SHAPE, removals, num, exact=exact, dtype=dtype)
                assert s_gpu.device.type == "cpu" and s_gpu.dtype == F64  # the documented contract
                torch.testing.assert_close(s_gpu, s_cpu, rtol=100 * tol, atol=tol * float(s_cpu.max()))
        d_cpu, d_gpu = ps.path_metric(cpu, zeroed, SHAPE), ps.path_metric(gpu, moved, SHAPE)
        assert d_gpu.exact and d_gpu.log2 == pytest.approx(d_cpu.log2, abs=1e-10)
        torch.testing.assert_close(ps.lipschitz_bound(gpu, moved, x.cuda()), ps.lipschitz_bound(cpu, zeroed, x),
                                   rtol=1e-10, atol=0)
        l_cpu, l_gpu = ps.layer_distances(cpu, zeroed, SHAPE), ps.layer_distances(gpu, moved, SHAPE)
        assert l_cpu.keys() == l_gpu.keys()
        for k in l_cpu:
            assert l_gpu[k].log2 == pytest.approx(l_cpu[k].log2, abs=1e-9)
        pruned, _ = ps.prune_unstructured(gpu, 0.5, SHAPE)
        assert next(pruned.parameters()).device.type == "cuda"
        rescaled = ps.random_rescale(gpu, generator=torch.Generator().manual_seed(0))
        assert next(rescaled.parameters()).device.type == "cuda"
        assert ps.path_norm(rescaled, SHAPE, dtype=F64).log2 == pytest.approx(ps.path_norm(gpu, SHAPE, dtype=F64).log2,
                                                                             abs=1e-10)
        data = [(x, torch.zeros(len(x), dtype=torch.long))]
        zeroed_cpu = copy.deepcopy(cpu)
        zeroed_cpu.load_state_dict(zeroed)
        r_cpu = ps.robustness_report(cpu, zeroed_cpu, data, input_shape=SHAPE)
        r_gpu = ps.robustness_report(gpu, copy.deepcopy(zeroed_cpu).cuda(), data, input_shape=SHAPE)
        assert r_gpu.exact and r_gpu.log10_distance == pytest.approx(r_cpu.log10_distance, abs=1e-9)
        assert r_gpu.observed_max == pytest.approx(r_cpu.observed_max, rel=1e-4)
        assert r_gpu.observed_max <= r_gpu.certified_bound


@cuda_test
def test_float32_on_cuda_agrees_with_float64_on_resnet50_at_224(assert_untouched):
    gpu = _resnet("resnet50").cuda()
    shape = (3, 224, 224)
    tf32 = torch.backends.cudnn.conv.fp32_precision
    with assert_untouched(gpu):
        r32, r64 = ps.path_norm(gpu, shape), ps.path_norm(gpu, shape, dtype=F64)
        m32, m64 = ps.path_magnitude(gpu, shape), ps.path_magnitude(gpu, shape, dtype=F64)
    assert torch.backends.cudnn.conv.fp32_precision == tf32  # the caller's setting is restored
    rel = abs(2 ** (r32.log2 - r64.log2) - 1)
    print(f"resnet50 224x224 on CUDA: float32 vs float64 path-norm relative error {rel:.3g}")
    assert rel < 1e-5  # TF32 convolutions would be ~1e-3
    worst = max(float(((m32[k].double() - m64[k]).abs() / m64[k].abs().max()).max()) for k in m64)
    assert worst < 1e-4


@cuda_test
def test_hot_loops_make_no_host_round_trips():
    with _host_syncs() as control:
        torch.ones(1, device="cuda").sum().item()
    assert control[0] >= 1  # the counter sees a read-back
    small, large = _resnet("resnet18").cuda(), _resnet("resnet50").cuda()
    counts = {}
    for name, m in (("resnet18", small), ("resnet50", large)):
        ps.path_norm(m, SHAPE)
        ps.path_magnitude(m, SHAPE)  # warm: captured graphs, prepared weights
        with _host_syncs() as norm:
            ps.path_norm(m, SHAPE)
        with _host_syncs() as mag:
            ps.path_magnitude(m, SHAPE)
        other = {k: v.clone() for k, v in m.state_dict().items()}
        with _host_syncs() as metric:
            ps.path_metric(m, other, SHAPE)
        counts[name] = (norm[0], mag[0], metric[0])
    print(f"host synchronisations (path_norm, path_magnitude, path_metric): {counts}")
    assert counts["resnet18"] == counts["resnet50"]  # independent of depth: none per layer
    assert counts["resnet18"][0] <= 2
    pooled = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(5), nn.Conv2d(8, 8, 3), nn.ReLU(),
                           nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(32, 10)).cuda().eval()
    ps.path_norm(pooled, SHAPE)
    with _host_syncs() as n:
        ps.path_norm(pooled, SHAPE)
    assert n[0] == counts["resnet18"][0]  # adaptive max-pooling's window counts are made on the device

    cpu = _resnet("resnet18")
    removals, num = _stream_removals(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    per = {}
    for budget in (2**40, 2**16):  # one chunk; one candidate per chunk (64 removal passes)
        ps.channel_saliency(gpu, SHAPE, removals, num, memory_budget=budget)
        with _host_syncs() as n:
            ps.channel_saliency(gpu, SHAPE, removals, num, memory_budget=budget)
        per[budget] = n[0]
    assert per[2**40] == per[2**16], per  # none per chunk


def test_ieee_float32_sets_and_restores_the_callers_tf32_settings():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
        with ieee_float32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
            with ieee_float32():
                pass
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        with pytest.raises(ZeroDivisionError), ieee_float32():
            1 / 0
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
