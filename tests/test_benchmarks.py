"""The benchmark scripts run and write the figures README quotes (a tiny model size: a smoke test of the
scripts, not a measurement), including the columns of the published implementation, here stood in for
by a stub with its API (its code is not part of this project)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PUBLISHED_STUB = {
    "pathnorm.py": (
        "import pathsaliency as ps, torch\n"
        "def compute_path_norm(model, input_shape, working_dtype=torch.float64):\n"
        "    return ps.path_norm(model, input_shape, dtype=working_dtype).value\n"),
    "repro/__init__.py": "",
    "repro/icml25/__init__.py": "",
    "repro/icml25/utils/__init__.py": "",
    "repro/icml25/utils/path_magnitude.py": (
        "import pathsaliency as ps\n"
        "def get_path_magnitude_scores(model, input_shape, working_dtype=None):\n"
        "    return ps.path_magnitude(model, input_shape[1:])\n"),
}


def test_bench_path_norm_writes_every_row_and_the_published_columns(tmp_path):
    for name, text in PUBLISHED_STUB.items():
        (tmp_path / "published" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "published" / name).write_text(text)
    out = tmp_path / "norm-resnet18.json"
    run = subprocess.run([sys.executable, "benchmarks/bench_path_norm.py", "--model", "resnet18", "--size", "32",
                          "--repeat", "1", "--threads", "1", "--published", str(tmp_path / "published"),
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    figures = json.loads(out.read_text())
    rows = figures["ratios"]
    for what in ("path_norm float32 first call", "path_norm float32 repeated", "path_norm float32 after a weight change",
                 "path_magnitude float32 first call", "path_magnitude float32 repeated",
                 "path_magnitude float32 after a weight change", "published path_norm float32",
                 "published path_magnitude float32"):
        assert rows[what] > 0 and figures["cpu_ratios"][what] > 0, what
    assert "relative difference 0.00e+00" in run.stdout  # the stub is our own float64 path-norm
    table = subprocess.run([sys.executable, "benchmarks/readme_table.py", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "| `published path_magnitude float32` |" in table.stdout
