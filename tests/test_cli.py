"""The command line for a new user: checkpoints (trusted or refused in one line), bad input of every
subcommand (one line on stderr, exit code 2, no traceback, no output file), random weights said so,
help texts with defaults, progress bars only on a terminal.

Runs the command in-process through ``main(argv)`` (a subprocess costs seconds of imports), on a tiny
conv net built by a factory module the tests write, ``tinynet:build`` with inputs of shape 3x8x8.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pathsaliency as ps
from pathsaliency.checkpoint import CheckpointError, load_checkpoint
from pathsaliency.cli import build_parser, main

TINYNET = """
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
def boom():
    raise RuntimeError("the factory is broken")
def not_a_model():
    return 42
"""
SHAPE = ["--input-shape", "3,8,8"]


class Evil:
    """Unpickling this runs ``os.system``: what a weights-only load must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder holding the factory module, checkpoints good and bad, and a data file."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tinynet.py").write_text(TINYNET)
    (root / "badimport.py").write_text("import a_module_that_does_not_exist\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        import tinynet

        torch.manual_seed(1)
        model = tinynet.build().eval()
        sd = model.state_dict()
        torch.save(sd, root / "sd.pt")
        torch.save({"model": sd}, root / "under_model.pt")
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, root / "dataparallel.pt")
        torch.save(model, root / "whole.pt")
        torch.save({"x": Evil(root / "pwned")}, root / "evil.pt")
        data = (root / "sd.pt").read_bytes()
        (root / "truncated.pt").write_bytes(data[: len(data) // 2])
        torch.save({k: v for k, v in sd.items() if k != "3.bias"}, root / "missing_key.pt")
        torch.save({**sd, "4.weight": torch.zeros(2)}, root / "extra_key.pt")
        torch.save({**sd, "3.weight": torch.zeros(3, 4 * 6 * 6)}, root / "wrong_shape.pt")
        pruned = {k: v * (v.abs() > v.abs().median()) if k.endswith("weight") else v for k, v in sd.items()}
        torch.save(pruned, root / "pruned.pt")
        torch.save(torch.rand(10, 3, 8, 8), root / "inputs.pt")
        yield {"root": root, "model": model, "sd": sd, "pruned": pruned}
    for name in ("tinynet", "badimport"):
        sys.modules.pop(name, None)


def run(argv, capsys, cwd):
    """``(exit code, stdout, stderr)`` of ``pathsaliency argv`` run in ``cwd``."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: usage errors, --help, --version
            rc = exc.code
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_refused(rc, err, *words):
    """Exit code 2 and one line on stderr holding every word, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("pathsaliency: note:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def listing(root):
    return sorted(p.name for p in Path(root).iterdir())


# --- checkpoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd.pt", "under_model.pt", "dataparallel.pt"])
def test_state_dict_forms_give_the_path_norm_of_the_saved_weights(files, capsys, name):
    rc, out, err = run(["norm", "tinynet:build", "--checkpoint", name, *SHAPE, "--json"], capsys, files["root"])
    assert rc == 0, err
    record = json.loads(out)
    assert record["log10_path_norm"] == pytest.approx(ps.path_norm(files["model"], (3, 8, 8)).log10, abs=1e-6)
    assert record["weights"] == f"checkpoint {name}"
    assert "RANDOM" not in err and "random" not in err


def test_whole_module_refused_in_one_line_and_loaded_when_trusted(files, capsys):
    rc, _, err = run(["norm", "tinynet:build", "--checkpoint", "whole.pt", *SHAPE], capsys, files["root"])
    assert_refused(rc, err, "whole.pt refused", "pickled code", "torch.nn.modules.container.Sequential",
                   "--trust-checkpoint", "trust")
    rc, out, err = run(["norm", "tinynet:build", "--checkpoint", "whole.pt", "--trust-checkpoint", *SHAPE], capsys,
                       files["root"])
    assert rc == 0, err
    assert f"{ps.path_norm(files['model'], (3, 8, 8)).log10:.6f}" in out


def test_trusted_whole_cifar_resnet_loads(tmp_path, capsys):
    """The reported case: ``norm cifar:resnet20 --checkpoint <torch.save(model)> --trust-checkpoint``."""
    from pathsaliency.models.cifar_resnet import load_cifar_resnet

    model = load_cifar_resnet("resnet20")
    torch.save(model, tmp_path / "whole_module.pt")
    rc, out, err = run(["norm", "cifar:resnet20", "--checkpoint", "whole_module.pt", "--trust-checkpoint", "--json"],
                       capsys, tmp_path)
    assert rc == 0, err
    assert json.loads(out)["log10_path_norm"] == pytest.approx(ps.path_norm(model, (3, 32, 32)).log10, abs=1e-6)


def test_pickled_code_is_refused_without_running_it(files, capsys):
    rc, _, err = run(["norm", "tinynet:build", "--checkpoint", "evil.pt", *SHAPE], capsys, files["root"])
    assert_refused(rc, err, "evil.pt refused", "posix.system", "--trust-checkpoint")
    assert not (files["root"] / "pwned").exists()


def test_one_weights_only_loader_for_the_cli_and_the_cifar_resnets(files):
    """``load_cifar_resnet`` refuses pickled code through the same loader, with the same one line."""
    from pathsaliency.models.cifar_resnet import load_cifar_resnet

    with pytest.raises(CheckpointError, match="refused: it holds pickled code .posix.system."):
        load_cifar_resnet("resnet20", checkpoint=files["root"] / "evil.pt")
    with pytest.raises(CheckpointError, match="is not a state dict of CIFAR resnet20: missing"):
        load_cifar_resnet("resnet20", checkpoint=files["root"] / "sd.pt")
    assert not (files["root"] / "pwned").exists()
    assert set(load_checkpoint(files["root"] / "dataparallel.pt")) == set(files["sd"])


# --- bad input of every subcommand ---------------------------------------------------------------------

def _norm(ckpt):
    return ["norm", "tinynet:build", "--checkpoint", ckpt, *SHAPE]


def _metric(ckpt):
    return ["metric", "tinynet:build", "--checkpoint", "sd.pt", ckpt, *SHAPE]


def _prune(ckpt):
    return ["prune", "tinynet:build", "--checkpoint", ckpt, *SHAPE, "--amount", "0.5", "--save", "out.pt"]


def _report(ckpt):
    return ["report", "tinynet:build", ckpt, "--checkpoint", "sd.pt", "--data", "inputs.pt", "--out", "rep"]


BAD_CHECKPOINTS = {
    "nothere.pt": ["nothere.pt", "no such file"],
    "truncated.pt": ["truncated.pt", "truncated or corrupt"],
    "missing_key.pt": ["missing_key.pt", "is not a state dict of tinynet:build", "missing 1 key(s) (3.bias)"],
    "extra_key.pt": ["extra_key.pt", "is not a state dict of tinynet:build", "1 unexpected key(s) (4.weight)"],
    "wrong_shape.pt": ["wrong_shape.pt", "3.weight has shape (3, 144), the model's is (2, 144)"],
    "whole.pt": ["whole.pt refused", "--trust-checkpoint"],
}


@pytest.mark.parametrize("command", [_norm, _metric, _prune, _report], ids=["norm", "metric", "prune", "report"])
@pytest.mark.parametrize("ckpt", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_exit_2_and_no_output(files, capsys, command, ckpt):
    before = listing(files["root"])
    rc, out, err = run(command(ckpt), capsys, files["root"])
    assert_refused(rc, err, *BAD_CHECKPOINTS[ckpt])
    assert out == ""
    assert listing(files["root"]) == before


BAD_MODELS = {
    "nomodule:build": ["module 'nomodule' does not import", "ModuleNotFoundError", "PYTHONPATH"],
    "badimport:build": ["module 'badimport' does not import", "a_module_that_does_not_exist"],
    "tinynet:nothing": ["module 'tinynet' has no function 'nothing'"],
    "tinynet:boom": ["tinynet.boom() raised RuntimeError: the factory is broken"],
    "tinynet:not_a_model": ["tinynet.not_a_model() returned a int, not a torch.nn.Module"],
    "tinynet": ["expected torchvision:<name>"],
    "torchvision:no_such_net": ["torchvision has no model 'no_such_net'"],
    "cifar:resnet99": ["unknown CIFAR ResNet 'resnet99'"],
}


@pytest.mark.parametrize("spec", sorted(BAD_MODELS))
def test_model_that_does_not_build_is_one_line_exit_2(files, capsys, spec):
    rc, _, err = run(["norm", spec, *SHAPE], capsys, files["root"])
    assert_refused(rc, err, f"model '{spec}'", *BAD_MODELS[spec])


@pytest.mark.parametrize("command", [["norm"], ["metric", "sd.pt"], ["prune", "--amount", "0.5", "--save", "o.pt"]],
                         ids=["norm", "metric", "prune"])
@pytest.mark.parametrize("shape, words", [
    ("3,16", ["failed on an input of shape (3, 16)"]),
    ("a,b", ["--input-shape", "'a,b': expected positive integers"]),
    ("3,-8,8", ["--input-shape", "'3,-8,8': expected positive integers"]),
    ("3,0,8", ["--input-shape", "expected positive integers"]),
    ("", ["--input-shape", "expected positive integers"]),
])
def test_wrong_input_shape_is_one_line_exit_2(files, capsys, command, shape, words):
    before = listing(files["root"])
    argv = [command[0], "tinynet:build", "--checkpoint", "sd.pt", *command[1:], f"--input-shape={shape}"]
    rc, _, err = run(argv, capsys, files["root"])
    assert_refused(rc, err, *words)
    assert listing(files["root"]) == before


def test_factory_without_input_shape_asks_for_one(files, capsys):
    rc, _, err = run(["norm", "tinynet:build"], capsys, files["root"])
    assert_refused(rc, err, "give --input-shape", "tinynet:build")


@pytest.mark.parametrize("argv, words", [
    (["prune", "tinynet:build", *SHAPE, "--amount", "1.5", "--save", "o.pt"], ["--amount", "between 0 and 1"]),
    (["prune", "tinynet:build", *SHAPE, "--amount", "0.5", "--save", "nodir/o.pt"], ["the folder nodir does not exist"]),
    (["prune", "tinynet:build", *SHAPE, "--amount", "0.5", "--save", "."], ["is a folder"]),
    (["report", "tinynet:build", "pruned.pt", "--data", "nothere.pt"], ["--data 'nothere.pt'", "cifar10-sample"]),
    (["report", "tinynet:build", "pruned.pt", "--data", "sd.pt"], ["--data sd.pt", "floating-point tensor"]),
    (["report", "tinynet:build", "pruned.pt", "--data", "truncated.pt"], ["--data truncated.pt", "truncated or corrupt"]),
    (["report", "tinynet:build", "pruned.pt", "--data", "inputs.pt", "--max-batches", "0"], ["--max-batches"]),
    (["report", "tinynet:build", "pruned.pt", "--data", "inputs.pt", "--out", "sd.pt"], ["sd.pt is a file"]),
    (["report", "tinynet:build", "pruned.pt", "--data", "inputs.pt", "--input-shape", "3,9,9"], ["3, 8, 8"]),
    (["demo", "--limit", "0"], ["--limit", "positive integer"]),
    (["demo", "--limit", "5000"], ["--limit 5000", "1000 images"]),
    (["demo", "--out", "sd.pt"], ["sd.pt is a file"]),
    (["norm", "tinynet:build", *SHAPE, "--pretrained"], ["--pretrained is for torchvision models"]),
    (["nrom", "tinynet:build"], ["invalid choice: 'nrom'"]),
])
def test_other_bad_input_is_one_line_exit_2_and_no_output(files, capsys, argv, words):
    before = listing(files["root"])
    rc, out, err = run(argv, capsys, files["root"])
    assert_refused(rc, err, *words)
    assert listing(files["root"]) == before


# --- outputs: written only after success ------------------------------------------------------------

def test_prune_saves_the_pruned_weights_and_nothing_when_certification_fails(files, capsys, tmp_path, monkeypatch):
    for name in ("tinynet.py", "sd.pt"):
        (tmp_path / name).write_bytes((files["root"] / name).read_bytes())
    argv = ["prune", "tinynet:build", "--checkpoint", "sd.pt", *SHAPE, "--amount", "0.5", "--save", "p.pt", "--json"]
    rc, out, err = run(argv, capsys, tmp_path)
    assert rc == 0, err
    record = json.loads(out)
    saved = torch.load(tmp_path / "p.pt", weights_only=True)
    zeros = sum(int((saved[k] == 0).sum()) for k in ("0.weight", "3.weight"))
    assert zeros == round(0.5 * (4 * 3 * 3 * 3 + 2 * 144))
    assert record["log10_distance"] == pytest.approx(ps.path_metric(files["model"], saved, (3, 8, 8)).log10, abs=1e-9)
    (tmp_path / "p.pt").unlink()
    before = listing(tmp_path)

    def fail(*a, **k):
        raise ps.PathSaliencyError("certification failed (test)")

    monkeypatch.setattr("pathsaliency.cli.path_metric", fail)
    rc, _, err = run(argv, capsys, tmp_path)
    assert_refused(rc, err, "certification failed (test)")
    assert listing(tmp_path) == before


def test_report_writes_its_three_files_or_none(files, capsys, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    argv = ["report", "tinynet:build", "pruned.pt", "--checkpoint", "sd.pt", "--data", "inputs.pt", "--out", out,
            "--json"]
    rc, stdout, err = run(argv, capsys, files["root"])
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    assert json.loads((out / "report.json").read_text()) == json.loads(stdout)

    def fail(self, path):
        raise OSError("the plot failed (test)")

    monkeypatch.setattr(ps.RobustnessReport, "plot", fail)
    out2 = tmp_path / "rep2"
    rc, _, err = run(argv[:-3] + ["--out", out2], capsys, files["root"])
    assert_refused(rc, err, "the plot failed (test)")
    assert not out2.exists() or list(out2.iterdir()) == []


# --- random weights, help, version, progress --------------------------------------------------------

def test_random_weights_are_said_so_and_seeded(files, capsys):
    values = []
    for seed in (["--seed", "3"], ["--seed", "3"], []):
        rc, out, err = run(["norm", "tinynet:build", *SHAPE, "--json", *seed], capsys, files["root"])
        assert rc == 0, err
        assert "note: tinynet:build has the weights the factory builds" in err
        values.append(json.loads(out)["log10_path_norm"])
    assert values[0] == values[1] != values[2]
    assert "(torch seed 0)" in err
    torch.manual_seed(0)  # default --seed 0: the weights tinynet.build() gives right after manual_seed(0)
    expected = ps.path_norm(sys.modules["tinynet"].build(), (3, 8, 8)).log10
    assert values[2] == pytest.approx(expected, abs=1e-6)


def test_torchvision_without_weights_is_said_random(files, capsys):
    rc, out, err = run(["norm", "torchvision:resnet18", "--input-shape", "3,32,32", "--json"], capsys, files["root"])
    assert rc == 0, err
    assert "note: torchvision:resnet18 has RANDOM weights (torch seed 0)" in err
    assert "--pretrained" in err and "--checkpoint" in err
    assert json.loads(out)["weights"].startswith("RANDOM weights")
    rc, _, err = run(["metric", "torchvision:resnet18", "nothere.pt", "--input-shape", "3,32,32"], capsys,
                     files["root"])
    assert "RANDOM weights" in err and rc == 2


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_option_has_help_with_its_default():
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"norm", "metric", "report", "prune", "demo"}
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}: no help text"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
        if name in ("norm", "metric", "prune", "report"):
            assert "RANDOM weights" in " ".join(text.split()) and "--seed" in text


def test_version(capsys):
    rc, out, _ = run(["--version"], capsys, Path.cwd())
    assert rc == 0 and out.strip() == f"pathsaliency {ps.__version__} (torch {torch.__version__})"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("flag, bar", [([], True), (["--no-progress"], False)])
def test_prune_progress_bar_only_on_a_terminal(files, tmp_path, monkeypatch, flag, bar):
    pytest.importorskip("tqdm")
    argv = ["prune", "tinynet:build", "--checkpoint", "sd.pt", *SHAPE, "--amount", "0.5", "--save", tmp_path / "p.pt"]
    monkeypatch.chdir(files["root"])
    for stream in (_Terminal(), io.StringIO()):  # a terminal, then a log file
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        assert main([str(a) for a in argv + flag]) == 0
        shown = "\r" in stream.getvalue() and "prune" in stream.getvalue()
        assert shown == (bar and isinstance(stream, _Terminal)), repr(stream.getvalue())


def test_console_refusal_is_one_line_in_a_real_process(files):
    src = str(Path(ps.__file__).resolve().parents[1])  # this checkout's code, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "pathsaliency.cli", "norm", "tinynet:build", "--checkpoint", "evil.pt",
                          *SHAPE], capture_output=True, text=True, cwd=files["root"], env=env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "refused" in out.stderr and "--trust-checkpoint" in out.stderr
    assert not (files["root"] / "pwned").exists()
