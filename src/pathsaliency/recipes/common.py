"""What every recipe shares: decoded data held as tensors, batched inference, top-1, seeds, batch-norm
re-estimation, tables written as CSV, Markdown and JSON (:func:`write_table`); robustness reports write
themselves (``RobustnessReport.save``)."""
from __future__ import annotations

import copy
import csv
import json
import random
from pathlib import Path

import torch

from pathsaliency.evaluate import outputs


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def as_tensors(dataset, batch_size=500, workers=0, progress=False, desc="decode"):
    """``(X, Y)``: a dataset decoded once into two tensors (CIFAR-10 test: 123 MB), so that the many
    models a recipe compares all see the same inputs without decoding JPEGs again."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, leave=False)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def predict(model, X, batch_size=500, device="cpu"):
    """Outputs (float32, on the CPU) of ``model`` on every row of ``X``, in batches of ``batch_size`` on
    ``device``: :func:`pathsaliency.evaluate.outputs` (eval mode, no TF32; the model itself never moves)."""
    chunks = [X[i:i + batch_size] for i in range(0, len(X), batch_size)]
    return outputs(model, chunks, device=device, progress=False).outputs.float()


def top1(logits, Y) -> float:
    return 100.0 * (logits.argmax(1) == Y).float().mean().item()


def write_table(rows: list, out: Path, stem: str, title: str, columns=None, formats=None) -> dict:
    """Write ``rows`` (a list of dicts) as ``stem.csv``, ``stem.md`` and ``stem.json`` under ``out``;
    returns the paths. ``formats`` maps a column to a format string for the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    columns = columns or list(rows[0])
    formats = formats or {}
    paths = {k: out / f"{stem}.{k}" for k in ("csv", "md", "json")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(paths["json"], "w") as f:
        json.dump(rows, f, indent=1)
    paths["md"].write_text(markdown_table(rows, columns, formats, title))
    return paths


def markdown_table(rows, columns, formats, title=None) -> str:
    def fmt(c, v):
        if isinstance(v, float) and c in formats:
            return format(v, formats[c])
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def reestimate_batchnorm(model, X, batch_size=256):
    """A copy of ``model`` whose batch-norm running statistics are recomputed on the images ``X`` (the
    cumulative average over its batches, ``momentum=None``), everything else unchanged, in eval mode.
    A pruned network's activations no longer match the statistics it was trained with; every one-shot
    comparison re-estimates them on the same images for every criterion."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in norms:
        m.train()
    for i in range(0, len(X), batch_size):
        model(X[i:i + batch_size])
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    return model.eval()
