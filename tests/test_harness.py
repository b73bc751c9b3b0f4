"""The recipes' harness: command line from a config dataclass, rank agreement, figure boilerplate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from pathsaliency.recipes import harness


@dataclass
class _Config:
    threads: Optional[int] = None
    ratio: float = 0.5


def test_main_parses_sets_threads_and_returns_the_run(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    got = harness.main(_Config, lambda c: ("ran", c), ["--threads", "3", "--ratio", "0.25"], prog="x", description="")
    assert got == ("ran", _Config(threads=3, ratio=0.25)) and calls == [3]
    calls.clear()
    harness.main(_Config, lambda c: c, [], prog="x", description="")
    assert calls == []  # None: torch's own choice is left alone


def test_rank_agreement_per_level():
    rows = [{"model": "m", "level": 0.3, "D": d, "top1": a} for d, a in ((0.1, 80.0), (0.2, 70.0), (0.3, 75.0))]
    rows += [{"model": "m", "level": 0.5, "D": d, "top1": a} for d, a in ((0.1, 60.0), (0.4, 50.0))]
    md = harness.rank_agreement(rows, ("model", "level"), ("D",), formats={"level": ".0%"})
    lines = md.splitlines()
    assert lines[0] == "| model | level | rows | rho(D) |"
    # drops 0, 10, 5 against D 0.1, 0.2, 0.3: ranks (1, 3, 2) vs (1, 2, 3) -> rho = 0.5
    assert lines[2] == "| m | 30% | 3 | 0.50 |" and lines[3] == "| m | 50% | 2 | 1.00 |"


def test_figure_label_save_keeps_the_legend_inside(tmp_path):
    pytest.importorskip("matplotlib")
    fig, axes = harness.figure(1, 2, panel=(3, 2))
    assert axes.shape == (1, 2)
    axes[0][0].plot([0, 1], [0, 1], label="a rather long legend entry that must not be clipped")
    harness.label(axes[0][0], "a title", "x", "y")
    harness.label(axes[0][1], "empty", "x", "y")  # nothing labelled: no legend, no warning
    assert axes[0][0].get_legend() is not None and axes[0][1].get_legend() is None
    harness.save(fig, tmp_path / "f.png", "a suptitle")
    assert (tmp_path / "f.png").stat().st_size > 0
