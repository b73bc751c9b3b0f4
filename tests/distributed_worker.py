"""One rank of tests/test_distributed.py (run as a script with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
set; Gloo, one thread): the group scores of a random torchvision ResNet-18 at 32x32, sharded and in one
process.

``python tests/distributed_worker.py OUT_DIR`` writes ``OUT_DIR/rank<r>.pt``; :func:`group_scores` is
also what the test computes in its own process.
"""
from __future__ import annotations

import datetime
import sys

import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

import pathsaliency as ps
from pathsaliency.integrations.torch_pruning import PathMetricImportance, group_removals

SHAPE = (3, 32, 32)
# 13 candidates per removal pass of the first residual stream (8 float32 tensors of its 64x8x8 activation
# each), 26 on the second...: every residual stream is 5 chunks, uneven over 2 ranks
BUDGET = 13 * 8 * 64 * 8 * 8 * 4


def model() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return m.eval()


def groups(m):
    DG = tp.DependencyGraph().build_dependency(m, torch.randn(1, *SHAPE))
    return list(DG.get_all_groups(ignored_layers=[m.fc], root_module_types=[nn.Conv2d]))


def group_scores(shard):
    """``{"direct": [channel_saliency per group, small memory budget], "importance": [PathMetricImportance
    per group]}`` for the model of :func:`model`."""
    m = model()
    gs = groups(m)
    direct = [ps.channel_saliency(m, SHAPE, group_removals(g), len(g[0].idxs), memory_budget=BUDGET, shard=shard)
              for g in gs]
    imp = PathMetricImportance(SHAPE, shard=shard)
    return {"direct": direct, "importance": [imp(g) for g in gs]}


def main(out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    result = {"sharded": group_scores("auto"), "one": group_scores(None)}
    m = model()
    gs = groups(m)
    result["explicit_group"] = [ps.channel_saliency(m, SHAPE, group_removals(g), len(g[0].idxs), memory_budget=BUDGET,
                                                    shard=torch.distributed.group.WORLD) for g in gs]
    g = gs[0]
    try:  # ranks that disagree on the call get an error, not a hang or a wrong number
        ps.channel_saliency(m, SHAPE, group_removals(g), len(g[0].idxs) + rank, memory_budget=BUDGET,
                            shard="auto")
        result["disagree"] = None
    except ps.PathSaliencyError as e:
        result["disagree"] = str(e)
    torch.save(result, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
