"""Path-norm and path-magnitude of a torchvision model, as ratios to one float32 forward pass.

    python benchmarks/bench_path_norm.py [--model resnet18] [--size 224] [--repeat 9] [--threads 2]
        [--device cuda] [--published PATH]

"first call" is a model object the library has never seen (tracing included); "repeated" is a second
call on the same, unchanged model (the captured graph and the prepared absolute weights are reused);
"after a weight change" is a call on the same model after one weight was written through ``.data`` (the
graph is reused, every value-derived cache is recomputed: what each step of iterative pruning pays).
Every round of the measurement runs the forward pass and then each row once, so that a load that
changes during the run weighs on both sides of the ratios alike; the ratios are medians over the rounds,
in wall time and in this process's CPU time.

``--published PATH``: a checkout of the published implementation (github.com/agonon/pathnorm-pytorch:
``pathnorm.compute_path_norm`` and ``repro/icml25/utils/path_magnitude.get_path_magnitude_scores``), timed
in the same rounds on the same model and checked against our values; it has no cache, so each of its calls
is a first call. Not a dependency: without the option those rows are left out.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
import torchvision

import pathsaliency as ps
from common import interleaved


def published_rows(path, model, shape):
    """The published implementation's path-norm (float32, float64) and path-magnitude (float32) as rows,
    and its float64 path-norm (for the value check)."""
    sys.path.insert(0, str(path))
    from pathnorm import compute_path_norm
    from repro.icml25.utils.path_magnitude import get_path_magnitude_scores

    rows = {
        "published path_norm float32": (lambda _: compute_path_norm(model, shape, working_dtype=torch.float32), None),
        "published path_norm float64": (lambda _: compute_path_norm(model, shape, working_dtype=torch.float64), None),
        "published path_magnitude float32": (lambda _: get_path_magnitude_scores(
            model, input_shape=(1, *shape), working_dtype=torch.float32), None),
    }
    return rows, compute_path_norm(model, shape, working_dtype=torch.float64)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the forward pass runs there too)")
    p.add_argument("--published", help="a checkout of github.com/agonon/pathnorm-pytorch, timed in the same rounds")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model).eval().to(args.device)
    shape = (3, args.size, args.size)
    x = torch.randn((1, *shape), device=args.device)
    fresh = lambda: copy.deepcopy(model)  # noqa: E731 (a model object the library has never seen)

    def changed(m):  # a setup: one weight of m has its sign flipped through .data (values differ from the cache)
        w = next(m.parameters()).data.view(-1)
        return lambda: w[:1].neg_()

    # every row has its own copy of the model (the caches of one row never serve another)
    rows = {}
    for dtype in (torch.float32, torch.float64):
        name, m = str(dtype)[6:], fresh()
        rows[f"path_norm {name} first call"] = (lambda f, d=dtype: ps.path_norm(f, shape, dtype=d), fresh)
        rows[f"path_norm {name} repeated"] = (lambda _, m=m, d=dtype: ps.path_norm(m, shape, dtype=d), None)
    m = fresh()
    rows["path_norm float32 after a weight change"] = (lambda _, m=m: ps.path_norm(m, shape), changed(m))
    rows["path_magnitude float32 first call"] = (lambda f: ps.path_magnitude(f, shape), fresh)
    m = fresh()
    rows["path_magnitude float32 repeated"] = (lambda _, m=m: ps.path_magnitude(m, shape), None)
    m = fresh()
    rows["path_magnitude float32 after a weight change"] = (lambda _, m=m: ps.path_magnitude(m, shape), changed(m))
    published_norm = None
    if args.published:
        extra, published_norm = published_rows(args.published, model, shape)
        rows.update(extra)

    def forward():
        with torch.no_grad():
            model(x)

    res = interleaved(rows, forward, repeat=args.repeat)
    n32 = ps.path_norm(model, shape, dtype=torch.float32)
    n64 = ps.path_norm(model, shape, dtype=torch.float64)
    rel = abs(2 ** (n32.log2 - n64.log2) - 1)

    where = torch.cuda.get_device_name() if x.is_cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.model} at {args.size}x{args.size}, batch 1, {where}")
    print(f"one float32 forward pass: {res['forward']['ms']:.1f} ms (CPU time {res['forward']['cpu_ms']:.1f} ms)")
    print(f"{'what':46s} {'ms':>8s} {'x forward':>10s} {'x fwd (CPU)':>12s}")
    for k in rows:
        r = res[k]
        print(f"{k:46s} {r['ms']:8.1f} {r['x_forward']:10.2f} {r['x_forward_cpu']:12.2f}")
    print(f"log10 path-norm {n64.log10:.6f}; float32 vs float64 relative error {rel:.2e}")
    if published_norm is not None:
        print(f"published float64 path-norm vs ours (float64): relative difference "
              f"{abs(published_norm / n64.value - 1):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "size": args.size, "device": where, "forward_ms": res["forward"]["ms"],
                       "ratios": {k: res[k]["x_forward"] for k in rows},
                       "cpu_ratios": {k: res[k]["x_forward_cpu"] for k in rows}, "float32_rel_error": rel}, f, indent=1)


if __name__ == "__main__":
    main()
