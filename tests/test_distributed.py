"""Sharded exact group scores (``shard="auto"`` under torch.distributed) equal one process's, bit for bit.

Two Gloo ranks on localhost (``tests/distributed_worker.py``, one thread each) score every group of a
random ResNet-18's dependency graph, through ``channel_saliency`` with a memory budget that cuts each
residual stream into 5 removal chunks (uneven over 2 ranks) and through ``PathMetricImportance``; every
rank's vector must equal, with ``torch.equal``, the one computed by this process alone, and ranks that
make different calls get an error.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")
import torch.distributed as dist  # noqa: E402

import pathsaliency as ps  # noqa: E402
from pathsaliency.distributed import map_chunks, process_group  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without Gloo")
def test_two_gloo_ranks_return_exactly_the_one_process_scores(tmp_path, one_thread):
    world = 2
    src = str(Path(ps.__file__).resolve().parents[1])
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    worker = _worker_module()
    reference = worker.group_scores(None)  # while the ranks run, one thread as each rank
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    first_order = [ps.channel_saliency(worker.model(), worker.SHAPE, worker.group_removals(g), len(g[0].idxs),
                                       exact=False) for g in worker.groups(worker.model())]
    # the test exercises removal passes: some groups' exact scores are not the first-order sum
    assert any(not torch.allclose(a, b) for a, b in zip(reference["direct"], first_order))
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for kind in ("direct", "importance"):
            for i, ref in enumerate(reference[kind]):
                assert torch.equal(got["sharded"][kind][i], ref), f"rank {r}, {kind}, group {i}: sharded != one process"
                assert torch.equal(got["one"][kind][i], ref), f"rank {r}, {kind}, group {i}: rank alone != this process"
        assert all(torch.equal(a, b) for a, b in zip(got["explicit_group"], reference["direct"]))
        assert got["disagree"] is not None and "disagree" in got["disagree"] and "rank 1: " in got["disagree"]


def test_map_chunks_in_one_process_and_shard_arguments():
    calls = []

    def fn(s):
        calls.append((s.start, s.stop))
        return torch.arange(s.start, s.stop, dtype=torch.float64)

    slices = [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert torch.equal(map_chunks(fn, slices, device="cpu", shard="auto"), torch.arange(7, dtype=torch.float64))
    assert calls == [(0, 3), (3, 6), (6, 7)]
    assert map_chunks(fn, [], device="cpu").shape == (0,)
    assert process_group(None) is None and process_group(False) is None
    if not dist.is_initialized():
        assert process_group("auto") is None  # no process group: one process
        with pytest.raises(ValueError, match="not initialised"):
            process_group(object())
    with pytest.raises(ValueError, match="'auto'"):
        process_group("yes")
