"""Exact group scores of every torch-pruning group, in one process and sharded over torch.distributed ranks.

    python benchmarks/bench_sharded_group_scores.py [--models resnet18 resnet50] [--size 224]
        [--runs 1x1 2x1 1x2] [--device cpu|cuda]

A run ``PxT`` is ``P`` processes (Gloo on localhost, ranks launched by this script as ``torchrun`` would)
of ``T`` threads each; every rank scores every group of ``DependencyGraph.get_all_groups`` (classifier
ignored) with ``PathMetricImportance`` (``shard="auto"``: each group's removal passes are split across
the ranks). Times are those of rank 0, also as a ratio to one float32 forward pass measured in the same
process; "identical" says whether every score equals (``torch.equal``) those of the first run with the
same number of threads per process. ``--device cuda`` puts rank ``r`` on GPU ``r`` with NCCL (needs ``P``
GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _worker(model_name, size, device, out):
    import torch
    import torch.distributed as dist
    import torch_pruning as tp
    import torchvision

    from common import forward_time, timed
    from pathsaliency.integrations.torch_pruning import PathMetricImportance

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name).eval().to(device)
    shape = (3, size, size)
    fwd = forward_time(model, shape, repeat=5)
    DG = tp.DependencyGraph().build_dependency(model, torch.randn(1, *shape, device=device))
    groups = list(DG.get_all_groups(ignored_layers=[model.fc], root_module_types=[torch.nn.Conv2d, torch.nn.Linear]))
    imp = PathMetricImportance(shape, shard="auto")
    sec, scores = timed(lambda: [imp(g) for g in groups])
    if rank == 0:
        torch.save({"seconds": sec, "forward_ms": fwd * 1e3, "groups": len(groups),
                    "candidates": sum(len(g[0].idxs) for g in groups), "scores": scores}, out)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model, size, procs, threads, device, out, timeout):
    env = {**os.environ, "WORLD_SIZE": str(procs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", out, "--models", model, "--size", str(size), "--device", device,
           "--threads", str(threads)]
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(procs)]
    for p in ranks:
        if p.wait(timeout=timeout) != 0:
            raise SystemExit(f"a rank of {model} {procs}x{threads} failed (exit {p.returncode})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", nargs="+", default=["1x1", "2x1", "1x2"], help="PROCESSESxTHREADS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        return _worker(args.models[0], args.size, args.device, args.worker)

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            first = {}  # threads per process -> scores of the first run with that many
            for run in args.runs:
                procs, threads = (int(v) for v in run.split("x"))
                out = f"{tmp}/{model}-{run}.pt"
                _launch(model, args.size, procs, threads, args.device, out, args.timeout)
                r = torch.load(out)
                ref = first.setdefault(threads, r["scores"])
                same = all(torch.equal(a, b) for a, b in zip(r["scores"], ref))
                row = {"model": model, "processes": procs, "threads": threads, "seconds": r["seconds"],
                       "forward_ms": r["forward_ms"], "x_forward": r["seconds"] / (r["forward_ms"] / 1e3),
                       "groups": r["groups"], "candidates": r["candidates"], "identical": same}
                rows.append(row)
                print(f"{model:10s} {procs} process(es) x {threads} thread(s): {row['seconds']:8.2f} s "
                      f"{row['x_forward']:8.1f} x forward (forward {row['forward_ms']:.1f} ms)  "
                      f"identical to the first {threads}-thread run: {same}  "
                      f"[{row['groups']} groups, {row['candidates']} candidates]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
