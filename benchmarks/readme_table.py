"""The README table of the ``--json`` files that ``benchmarks/gpu.sh`` writes into one folder.

    python benchmarks/readme_table.py out/gpu
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder):
    folder = Path(folder)
    norms = [json.loads(p.read_text()) for p in sorted(folder.glob("norm-*.json"))]
    norms.sort(key=lambda r: (len(r["model"]), r["model"]))  # resnet18, resnet50, resnet152
    if norms:
        size = norms[0]["size"]
        print(f"Ratios to one float32 forward pass ({norms[0]['device']}, batch 1, {size}x{size}):")
        print()
        print("| what | " + " | ".join(r["model"] for r in norms) + " |")
        print("| --- |" + " --- |" * len(norms))
        print("| forward pass (ms) | " + " | ".join(f"{r['forward_ms']:.2f}" for r in norms) + " |")
        rows = list(dict.fromkeys(k for r in norms for k in r["ratios"]))  # in the benchmark's order
        for k in rows:
            print(f"| `{k}` | " + " | ".join(f"{r['ratios'][k]:.2f}" if k in r["ratios"] else "" for r in norms) + " |")
        print("| float32 vs float64 (relative) | " + " | ".join(f"{r['float32_rel_error']:.1e}" for r in norms) + " |")
        print()
    for name in ("groups.json", "sharded.json"):
        p = folder / name
        if not p.exists():
            continue
        rows = json.loads(p.read_text())
        if name == "groups.json":
            print("| model | method | time | x forward | groups, candidates |")
            print("| --- | --- | --- | --- | --- |")
            for r in rows:
                print(f"| {r['model']} | {r['method']} | {r['seconds']:.3g} s | {r['x_forward']:.1f} | "
                      f"{r['groups']}, {r['candidates']} |")
        else:
            print("| model | processes x threads | time | x forward | identical |")
            print("| --- | --- | --- | --- | --- |")
            for r in rows:
                print(f"| {r['model']} | {r['processes']} x {r['threads']} | {r['seconds']:.3g} s | "
                      f"{r['x_forward']:.1f} | {r['identical']} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/gpu")
