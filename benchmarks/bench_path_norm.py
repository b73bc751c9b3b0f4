"""Path-norm and path-magnitude of a torchvision model, as ratios to one float32 forward pass.

    python benchmarks/bench_path_norm.py [--model resnet18] [--size 224] [--repeat 7] [--device cuda]

"first call" is a model object the library has never seen (tracing included); "repeated" is a second
call on the same model (the captured graph and the prepared absolute weights are reused).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torchvision

import pathsaliency as ps
from common import forward_time, median_time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the forward pass runs there too)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model).eval().to(args.device)
    shape = (3, args.size, args.size)
    fwd = forward_time(model, shape, args.repeat)

    rows = {}
    for dtype in (torch.float32, torch.float64):
        first = median_time(lambda m: ps.path_norm(m, shape, dtype=dtype), repeat=args.repeat,
                            setup=lambda: copy.deepcopy(model))
        ps.path_norm(model, shape, dtype=dtype)
        again = median_time(lambda _: ps.path_norm(model, shape, dtype=dtype), repeat=args.repeat)
        rows[f"path_norm {str(dtype)[6:]} first call"] = first
        rows[f"path_norm {str(dtype)[6:]} repeated"] = again
    mag_first = median_time(lambda m: ps.path_magnitude(m, shape), repeat=max(3, args.repeat // 2),
                            setup=lambda: copy.deepcopy(model))
    rows["path_magnitude float32 first call"] = mag_first
    ps.path_magnitude(model, shape)
    rows["path_magnitude float32 repeated"] = median_time(lambda _: ps.path_magnitude(model, shape),
                                                          repeat=max(3, args.repeat // 2))
    n32 = ps.path_norm(model, shape, dtype=torch.float32)
    n64 = ps.path_norm(model, shape, dtype=torch.float64)
    rel = abs(2 ** (n32.log2 - n64.log2) - 1)

    where = torch.cuda.get_device_name() if model.fc.weight.is_cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.model} at {args.size}x{args.size}, batch 1, {where}")
    print(f"one float32 forward pass: {fwd * 1e3:.1f} ms")
    print(f"{'what':40s} {'ms':>9s} {'x forward':>10s}")
    for k, v in rows.items():
        print(f"{k:40s} {v * 1e3:9.1f} {v / fwd:10.2f}")
    print(f"log10 path-norm {n64.log10:.6f}; float32 vs float64 relative error {rel:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "size": args.size, "device": where, "forward_ms": fwd * 1e3,
                       "ratios": {k: v / fwd for k, v in rows.items()}, "float32_rel_error": rel}, f, indent=1)


if __name__ == "__main__":
    main()
