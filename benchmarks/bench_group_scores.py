"""All structured (torch-pruning group) scores of a torchvision model: time and peak memory.

    python benchmarks/bench_group_scores.py [--models resnet18 resnet50] [--size 224] [--device cuda]

Compares, on the same groups (every group of ``DependencyGraph.get_all_groups``, classifier ignored):

* ``PathMetricImportance`` (exact): one forward/backward of the path-norm pass for every antichain
  group, batched removal passes for the others (residual streams);
* ``PathMetricImportance(exact=False)``: the first-order approximation;
* (a) recomputing the path-norm once per candidate channel (measured as the time of one repeated
  ``path_norm`` call times the number of candidates: a lower bound of that baseline); with
  ``--published PATH`` (a checkout of github.com/agonon/pathnorm-pytorch) also
  ``published-per-candidate``, the same with the published ``compute_path_norm`` (float32), which is
  how that implementation would score channels;
* (b) torch-pruning's ``MagnitudeImportance``;
* ``step-exact`` / ``step-first-order``: one ``MetaPruner.step()`` (global, half the channels, classifier
  ignored) with ``PathMetricImportance`` exact / ``exact=False``: scoring every group and pruning.

Each method runs in a fresh process (so its peak resident memory is its own); times are ratios to one
float32 forward pass of the model measured in that process, in wall time and in the process's CPU time
(with ``--threads 1`` the CPU-time ratio barely moves when other jobs share the machine; wall time does).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def _forward_cpu(model, shape, device, repeat=5):
    """CPU time of one float32 forward pass (the mean of ``repeat``, after one warm-up)."""
    import torch

    x = torch.randn((1,) + tuple(shape), device=device)
    with torch.no_grad():
        model(x)
        t = time.process_time()
        for _ in range(repeat):
            model(x)
        return (time.process_time() - t) / repeat


def _measure(model_name, size, method, device, queue, threads=None, published=None):
    import torch
    import torch_pruning as tp
    import torchvision

    import pathsaliency as ps
    from common import forward_time, median_time, peak_rss_mb, timed
    from pathsaliency.integrations.torch_pruning import PathMetricImportance

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name).eval().to(device)
    shape = (3, size, size)
    fwd = forward_time(model, shape, repeat=5)  # before and after: the ratio uses their mean
    fwd_cpu = _forward_cpu(model, shape, device)
    base_rss = peak_rss_mb()
    DG = tp.DependencyGraph().build_dependency(model, torch.randn(1, *shape, device=device))
    groups = list(DG.get_all_groups(ignored_layers=[model.fc], root_module_types=[torch.nn.Conv2d, torch.nn.Linear]))
    candidates = sum(len(g[0].idxs) for g in groups)
    imps = {"path-metric": lambda: PathMetricImportance(shape, progress=False),
            "first-order": lambda: PathMetricImportance(shape, exact=False, progress=False),
            "magnitude": lambda: tp.importance.MagnitudeImportance(p=1)}
    cpu0 = time.process_time()
    if method.startswith("step-"):
        imp = imps["path-metric" if method == "step-exact" else "first-order"]()
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, *shape, device=device), importance=imp, pruning_ratio=0.5,
                                      global_pruning=True, ignored_layers=[model.fc])
        sec, _ = timed(pruner.step)
    elif method in ("per-candidate", "published-per-candidate"):
        norm = lambda: ps.path_norm(model, shape)  # noqa: E731
        if method.startswith("published"):
            import sys

            sys.path.insert(0, published)
            from pathnorm import compute_path_norm

            norm = lambda: compute_path_norm(model, shape, working_dtype=torch.float32)  # noqa: E731
        norm()
        cpu0 = time.process_time()  # the warm-up and five timed calls
        per = median_time(lambda _: norm(), repeat=5)
        sec = per * candidates
    else:
        imp = imps[method]()
        sec, _ = timed(lambda: [imp(g) for g in groups])
    cpu = time.process_time() - cpu0
    if method.endswith("per-candidate"):
        cpu *= candidates / 6  # six path_norm calls were timed
    fwd = (fwd + forward_time(model, shape, repeat=5)) / 2
    fwd_cpu = (fwd_cpu + _forward_cpu(model, shape, device)) / 2
    queue.put({"model": model_name, "method": method, "device": device, "seconds": sec, "forward_ms": fwd * 1e3,
               "x_forward": sec / fwd, "cpu_seconds": cpu, "x_forward_cpu": cpu / fwd_cpu, "groups": len(groups), "candidates": candidates,
               "peak_rss_mb": peak_rss_mb(), "extra_rss_mb": peak_rss_mb() - base_rss})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--methods", nargs="+", default=["path-metric", "first-order", "per-candidate", "magnitude",
                                                    "step-exact", "step-first-order"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each process (default: torch's)")
    p.add_argument("--published", help="a checkout of github.com/agonon/pathnorm-pytorch: adds the method "
                                        "published-per-candidate")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.published and "published-per-candidate" not in args.methods:
        args.methods.append("published-per-candidate")
    ctx = mp.get_context("spawn")
    rows = []
    for m in args.models:
        for method in args.methods:
            q = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(m, args.size, method, args.device, q, args.threads,
                                                                 args.published))
            proc.start()
            row = q.get()
            proc.join()
            rows.append(row)
            print(f"{m:10s} {method:16s} {row['seconds']:9.2f} s  {row['x_forward']:9.1f} x forward  "
                  f"(CPU {row['cpu_seconds']:8.2f} s, {row['x_forward_cpu']:8.1f} x)  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB (+{row['extra_rss_mb']:.0f})  "
                  f"[{row['groups']} groups, {row['candidates']} candidates, forward {row['forward_ms']:.1f} ms]",
                  flush=True)
    for m in args.models:
        by = {r["method"]: r for r in rows if r["model"] == m}
        for base in ("per-candidate", "published-per-candidate"):
            if "path-metric" in by and base in by:
                print(f"{m}: exact group scores are {by[base]['seconds'] / by['path-metric']['seconds']:.1f}x "
                      f"faster than one path-norm per candidate ({base})")
        if "path-metric" in by and "first-order" in by:
            print(f"{m}: exact / first-order = {by['path-metric']['x_forward'] / by['first-order']['x_forward']:.1f} "
                  f"(wall), {by['path-metric']['x_forward_cpu'] / by['first-order']['x_forward_cpu']:.1f} (CPU)")
        if "step-exact" in by and "step-first-order" in by:
            print(f"{m}: MetaPruner step exact / first-order = "
                  f"{by['step-exact']['x_forward'] / by['step-first-order']['x_forward']:.1f} (wall), "
                  f"{by['step-exact']['x_forward_cpu'] / by['step-first-order']['x_forward_cpu']:.1f} (CPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
