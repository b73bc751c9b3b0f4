"""Writing result files so that a failure leaves none of them half-written."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def write_atomically(files: dict) -> None:
    """Write ``{path: text, or a function path -> None, or an object for torch.save}``: each to a temporary
    name beside it first, then all renamed, so a failure leaves none of them."""
    temps = {}
    try:
        for path, content in files.items():
            path = Path(path)
            temp = path.with_name(f".{path.stem}.partial{path.suffix}")
            temps[temp] = path
            if callable(content):
                content(temp)
            elif isinstance(content, str):
                temp.write_text(content, encoding="utf-8")
            else:
                torch.save(content, temp)
        for temp, path in temps.items():
            os.replace(temp, path)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
