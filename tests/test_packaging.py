"""The project installs and runs from its own files: README commands = CI, wheel contents, imports
without the optional frameworks, and the command line."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch_pruning", "nncf", "neural_compressor", "torchao", "matplotlib", "tqdm")


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Fresh setup", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_ci_runs_exactly_the_two_readme_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command.strip() in ci, f"{command!r} is not a line of .ci/run"


def test_wheel_makes_core_and_adapters_importable(tmp_path):
    """A plain (non-editable) install carries the core, the adapters and the recipes."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    code = ("import pathsaliency, pathsaliency.integrations, pathsaliency.recipes.unstructured, "
            "pathsaliency.models.cifar_resnet as c; import importlib.resources as r; "
            "print(pathsaliency.__file__); print(pathsaliency.integrations.__file__); "
            "print((r.files('pathsaliency') / 'assets' / 'cifar10-sample.zip').is_file())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, check=True).stdout.split()
    assert all(p.startswith(str(target)) for p in out[:2]), out
    assert out[2] == "True"
    names = {p.name.removesuffix(".py") for p in (target / "pathsaliency" / "integrations").iterdir()}
    assert {"torch_pruning", "nncf", "neural_compressor"} <= names  # modules or packages


BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {names!r}:
            raise ImportError('hidden for the test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_core_imports_and_computes_with_every_framework_hidden(tmp_path):
    code = BLOCK.format(names=FRAMEWORKS) + (
        "import torch, pathsaliency as ps\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
        "print(ps.path_norm(m, (3,)).value > 0)\n"
        "for mod in ('nncf', 'neural_compressor', 'torch_pruning'):\n"
        "    try:\n"
        "        __import__('pathsaliency.integrations.' + mod)\n"
        "        print('imported', mod)\n"
        "    except ImportError as e:\n"
        "        print('refused', mod, 'pip install' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "True"
    assert lines[1:] == ["refused nncf True", "refused neural_compressor True", "refused torch_pruning True"]


def _cli(*args, cwd=None):
    """``python -m pathsaliency.cli`` on this checkout's code (``src/`` first on the path), in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pathsaliency.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def test_cli_norm_on_the_packaged_cifar_resnet(tmp_path):
    out = _cli("norm", "cifar:resnet20", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert '"log10_path_norm": 21.9' in out.stdout


def test_cli_refuses_unsupported_models_with_the_node_named(tmp_path):
    out = _cli("norm", "torchvision:mobilenet_v2", cwd=tmp_path)
    assert out.returncode == 2
    assert "ReLU6 module 'features.0.2'" in out.stderr


def test_cli_user_factory_and_checkpoint_and_pickle_refusal(tmp_path):
    (tmp_path / "mynet.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet
        model = mynet.build()
    finally:
        sys.path.remove(str(tmp_path))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "w.pt")
    out = _cli("norm", "mynet:build", "--checkpoint", "w.pt", "--input-shape", "3,8,8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    import pathsaliency as ps

    assert f"{ps.path_norm(model, (3, 8, 8)).log10:.6f}" in out.stdout
    torch.save(model, tmp_path / "whole.pt")  # a pickled module: code, not weights
    out = _cli("norm", "mynet:build", "--checkpoint", "whole.pt", "--input-shape", "3,8,8", cwd=tmp_path)
    assert out.returncode == 2 and "--trust-checkpoint" in out.stderr
    out = _cli("norm", "mynet:build", "--checkpoint", "whole.pt", "--input-shape", "3,8,8", "--trust-checkpoint",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr


APPLICATION = ("pathsaliency.recipes", "pathsaliency.integrations")


def _application(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in APPLICATION)


def _imported(source: str, module: str) -> set:
    """Absolute names of the modules that ``source`` (the text of module ``module``) imports, lazily or not;
    ``from X import y`` counts as both ``X`` and ``X.y`` (y may be a submodule)."""
    package = module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            frm = ".".join(filter(None, [base, node.module]))
            names.add(frm)
            names.update(f"{frm}.{alias.name}" for alias in node.names)
    return names


def _core_modules():
    """``{module name: path}`` of the core: every module of src/pathsaliency but cli.py, recipes/, integrations/."""
    pkg = ROOT / "src" / "pathsaliency"
    out = {}
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        if name == "pathsaliency.cli" or _application(name):
            continue
        out[name if rel.name != "__init__" else name + ".__init__"] = path
    return out


def test_import_scanner_sees_every_form_of_importing_the_application_layer():
    forms = ["from .recipes import demo", "from . import integrations", "import pathsaliency.recipes.demo",
             "from pathsaliency.integrations.nncf import x", "def f():\n    from ..recipes.common import y",
             "from .. import integrations"]
    for form in forms:
        names = _imported(form, "pathsaliency.models.cifar_resnet" if ".." in form else "pathsaliency.norm")
        assert any(_application(n) for n in names), form
    for harmless in ("from .norm import recipes", "from . import recipes_table", "import recipes"):
        assert not any(_application(n) for n in _imported(harmless, "pathsaliency.x")), harmless


def test_core_never_imports_recipes_or_integrations():
    """The layers: core <- integrations, recipes <- cli. Only cli.py (the application) may import recipes."""
    core = _core_modules()
    assert {"pathsaliency.__init__", "pathsaliency.norm", "pathsaliency.zoo", "pathsaliency.checkpoint",
            "pathsaliency.models.cifar_resnet"} <= set(core)
    offenders = {name: sorted(filter(_application, _imported(path.read_text(), name)))
                 for name, path in core.items()}
    assert not {k: v for k, v in offenders.items() if v}, offenders
