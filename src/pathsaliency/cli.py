"""The pathsaliency command: path-norm, path-metric, pruning and robustness reports of a model.

Layer: application. The core (every other module of ``pathsaliency`` except ``recipes/`` and
``integrations/``) never imports ``pathsaliency.recipes`` or ``pathsaliency.integrations``
(tests/test_packaging.py checks it); this module may, lazily: ``demo`` runs a recipe and ``report`` reads
CIFAR-10 through one.

Contract: bad input (a model that does not build, a checkpoint that is missing, truncated, holds pickled
code without ``--trust-checkpoint`` or does not fit the model, a wrong ``--input-shape`` ...) prints one
line ``pathsaliency: error: ...`` on stderr (a model that is not a ReLU-DAG: one more line per offending
node) and exits with code 2, without a traceback and without writing any output file: ``prune`` and
``report`` write under a temporary name and rename once everything succeeded; ``demo`` checks its
options before it starts. Random weights are said so on stderr.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import torch

from . import __version__, path_metric, path_norm
from .checkpoint import TRUST_HINT, load_checkpoint, load_state_dict, torch_load
from .errors import PathSaliencyError
from .files import write_atomically
from .pruning import CRITERIA
from .zoo import SPEC_HELP, default_input_shape, load_model, weights_source

REPORT_BATCH = 250  # ``report --data``: samples per batch


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options that have a default worth stating (not None or False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _checked(convert, ok, expected):
    """An argparse type: ``convert(text)``, refused in one line naming ``expected`` unless ``ok`` of it."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value
    return parse


_shape = _checked(lambda text: tuple(int(v) for v in text.replace("x", ",").split(",")), lambda s: min(s) >= 1,
                  "positive integers separated by commas, e.g. 3,224,224")
_fraction = _checked(float, lambda v: 0 <= v <= 1, "a fraction between 0 and 1, e.g. 0.5")
_positive = _checked(int, lambda v: v >= 1, "a positive integer")


MODEL_HELP = (f"the model: {SPEC_HELP}. Weights: cifar loads its pretrained ones (packaged, or from $PATHSALIENCY_SHARED); torchvision and "
              "<module>:<function> models have RANDOM weights (seeded by --seed) unless --checkpoint or --pretrained")


def _add_weights(p, checkpoint=True, files="checkpoints"):
    if checkpoint:
        p.add_argument("--checkpoint", metavar="FILE", help="weights to load: a state dict (also under 'state_dict' "
                       "or 'model', 'module.' prefixes stripped), loaded weights-only")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help=f"load {files} with pickled code too (torch.load weights_only=False; accepts a whole "
                        "torch.save(model)); runs that code: only for files you trust")
    p.add_argument("--pretrained", action="store_true", help="torchvision: the default pretrained weights (internet)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch's generator while a model is built")


def _add_model(p, dtype, dtype_help="precision of the path-lifting passes"):
    p.add_argument("model", help=MODEL_HELP)
    _add_weights(p)
    p.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                   help="shape of one input sample (default: 3,32,32 for cifar, 3,224,224 for torchvision, "
                        "3,299,299 for inception_v3; required for <module>:<function>)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=dtype, help=dtype_help)
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")


def _add_progress(p):
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal, or without tqdm)")


def _progress(args) -> bool:
    return not args.no_progress and sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None


def _note(text):
    print(f"pathsaliency: note: {text}", file=sys.stderr)


def _input_shape(args, spec):
    shape = args.input_shape or default_input_shape(spec)
    if shape is None:
        raise ValueError(f"give --input-shape (e.g. 3,224,224) for {spec}: it has no default input shape")
    return shape


def _model(args, spec, checkpoint):
    """``spec`` with ``checkpoint``, saying so on stderr when its weights may be random."""
    model = load_model(spec, checkpoint, args.trust_checkpoint, args.pretrained, args.seed)
    source, random = weights_source(spec, checkpoint, args.pretrained, args.seed)
    if random:
        _note(f"{spec} has {source}")
    return model


def _weights(args, spec, checkpoint) -> str:
    return weights_source(spec, checkpoint, args.pretrained, args.seed)[0]


class _Steps:
    """A progress bar over the named steps of a command: tqdm on stderr when ``on``, nothing otherwise."""

    def __init__(self, on: bool, names, desc: str):
        self.bar, self.started = None, 0
        if on:
            from tqdm import tqdm

            self.bar = tqdm(total=len(names), desc=desc, file=sys.stderr, leave=False,
                            bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def __call__(self, name: str):
        """Step ``name`` starts (the previous one is done)."""
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.set_postfix_str(name)
        self.started += 1

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _writable_file(path):
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the path of the file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")


def _writable_folder(path):
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{path} is a file: give the folder to write into")


def cmd_norm(args):
    shape = _input_shape(args, args.model)
    model = _model(args, args.model, args.checkpoint)
    result = path_norm(model, shape, q=args.q, dtype=getattr(torch, args.dtype))
    record = {"model": args.model, "weights": _weights(args, args.model, args.checkpoint), "input_shape": list(shape),
              "q": args.q, "log10_path_norm": result.log10, "path_norm": result.value}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{args.model}: l{args.q:g} path-norm = {result.value:.6g} (log10 = {result.log10:.6f})")


def cmd_metric(args):
    shape = _input_shape(args, args.model)
    a = _model(args, args.model, args.checkpoint)
    b = _model(args, args.model, args.other_checkpoint)
    result = path_metric(a, b, shape, dtype=getattr(torch, args.dtype))
    record = {"model": args.model, "weights": _weights(args, args.model, args.checkpoint),
              "other_checkpoint": args.other_checkpoint, "log10_distance": result.log10, "distance": result.value,
              "exact": result.exact, "relative": result.relative, "log10_path_norm": result.norm.log10}
    if args.json:
        print(json.dumps(record))
    else:
        kind = "exact" if result.exact else "certified upper bound"
        print(f"D = {result.value:.6g} (log10 = {result.log10:.6f}, {kind}); D / ||Phi|| = {result.relative:.3g}")


def _report_data(spec, trust=False, flag="--data"):
    """``--data`` of ``report`` (and ``--calibration`` of ``prune``): the CIFAR-10 sample/test/train set or a .pt file holding a tensor of inputs
    (optionally with labels, as a pair), in batches of ``REPORT_BATCH``."""
    splits = {"cifar10-sample": ("test", "sample"), "cifar10-test": ("test", "auto"), "cifar10-train": ("train", "auto")}
    if spec in splits:
        from torch.utils.data import DataLoader

        split, source = splits[spec]
        try:
            from pathsaliency.recipes.cifar10 import cifar10
        except ImportError as exc:
            raise ValueError(f"{flag} {spec} needs the recipes extras: pip install 'pathsaliency[recipes]' ({exc})") from exc
        try:
            dataset = cifar10(split, source=source)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{flag} {spec}: could not load the data set ({exc})") from exc
        return DataLoader(dataset, batch_size=REPORT_BATCH, shuffle=False)
    if not Path(spec).is_file():
        raise ValueError(f"{flag} {spec!r}: expected cifar10-sample, cifar10-test, cifar10-train or the path of a "
                         ".pt file holding a tensor of inputs")
    obj = torch_load(spec, trust, what=flag)
    labels = None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(torch.is_tensor(t) for t in obj):
        obj, labels = obj
    if not torch.is_tensor(obj) or obj.dim() < 2 or not obj.is_floating_point() or obj.shape[0] == 0:
        raise ValueError(f"{flag} {spec}: expected a non-empty floating-point tensor of inputs (batch first)")
    if labels is None:
        return [obj[i:i + REPORT_BATCH] for i in range(0, obj.shape[0], REPORT_BATCH)]
    return [(obj[i:i + REPORT_BATCH], labels[i:i + REPORT_BATCH]) for i in range(0, obj.shape[0], REPORT_BATCH)]


def cmd_report(args):
    from .report import robustness_report

    _writable_folder(args.out)
    obj = load_checkpoint(args.compressed, args.trust_checkpoint)
    data = _report_data(args.data, args.trust_checkpoint)
    reference = _model(args, args.reference, args.checkpoint)
    if isinstance(obj, torch.nn.Module):
        compressed = obj.eval()
    else:
        compressed = load_model(args.reference, args.checkpoint, args.trust_checkpoint, args.pretrained, args.seed)
        load_state_dict(compressed, obj, args.compressed, args.reference)
    report = robustness_report(reference, compressed, data, input_shape=args.input_shape, progress=_progress(args),
                               max_batches=args.max_batches, name=f"{args.reference} vs {args.compressed}")
    report.save(args.out)
    print(report.to_json() if args.json else report.to_markdown())


def cmd_prune(args):
    from .pruning import prune_unstructured, resolve_criterion

    _writable_file(args.save)
    shape = _input_shape(args, args.model)
    steps = _Steps(_progress(args), ("load", "score and prune", "certify", "save"), "prune")
    try:
        steps("load")
        model = _model(args, args.model, args.checkpoint)
        steps("score and prune")
        calibration = None
        if args.calibration is not None:
            batches = _report_data(args.calibration, args.trust_checkpoint, flag="--calibration")
            calibration = list(itertools.islice(batches, args.calibration_batches))
        args.criterion = resolve_criterion(args.criterion, model, calibration)
        pruned, _ = prune_unstructured(model, args.amount, shape, criterion=args.criterion, scope=args.scope,
                                       calibration=calibration, dtype=getattr(torch, args.dtype))
        steps("certify")
        d = path_metric(model, pruned, shape)
        steps("save")
        write_atomically({args.save: pruned.state_dict()})
    finally:
        steps.close()
    record = {"model": args.model, "weights": _weights(args, args.model, args.checkpoint), "criterion": args.criterion,
              "scope": args.scope, "amount": args.amount, "saved": args.save, "log10_distance": d.log10,
              "relative_distance": d.relative, "exact": d.exact}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"pruned {args.amount:.0%} of the weights of {args.model} by {args.criterion} ({args.scope}); saved to "
              f"{args.save}; certified D = {d.value:.6g} (D / ||Phi|| = {d.relative:.3g}, exact)")


DEMO_IMAGES = 1000  # CIFAR-10 test images packaged with pathsaliency


def cmd_demo(args):
    if args.limit is not None and args.limit > DEMO_IMAGES:
        raise ValueError(f"--limit {args.limit}: the package holds {DEMO_IMAGES} images")
    _writable_folder(args.out)
    try:
        from .recipes.demo import run_demo
    except ImportError as exc:
        raise ValueError(f"pathsaliency demo needs the recipes extra ({exc}): pip install 'pathsaliency[recipes]'")
    run_demo(args.out, args.limit, progress=_progress(args))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pathsaliency", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)

    p = command("norm", "the l_q path-norm ||Phi(theta)||_q of a model")
    _add_model(p, dtype="float32")
    p.add_argument("--q", type=float, default=1.0, help="the exponent q (1: the l1 path-norm of the certificate)")
    p.set_defaults(func=cmd_norm)

    p = command("metric", "the certified l1 path-metric D between two sets of weights of one architecture: the "
                          "model (with --checkpoint) and OTHER_CHECKPOINT")
    _add_model(p, dtype="float64")
    p.add_argument("other_checkpoint", metavar="OTHER_CHECKPOINT", help="the second weights (same architecture)")
    p.set_defaults(func=cmd_metric)

    p = command("report", "robustness report of a compressed checkpoint: certified bound vs deviation observed on "
                          "data; writes report.json, report.md, report.png")
    p.add_argument("reference", help=MODEL_HELP.replace("the model", "the reference model", 1))
    p.add_argument("compressed", help="checkpoint of the compressed model: a state dict of the reference's "
                                      f"architecture, or a whole module with {TRUST_HINT.split(' ')[0]}")
    p.add_argument("--data", required=True,
                   help="cifar10-sample (1,000 packaged images), cifar10-test, cifar10-train, or a .pt file holding "
                        f"a tensor of inputs (or an (inputs, labels) pair), used in batches of {REPORT_BATCH}")
    p.add_argument("--checkpoint", metavar="FILE", help="weights of the reference model, loaded weights-only")
    _add_weights(p, checkpoint=False, files="checkpoints and --data files")
    p.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="shape of one input sample (default: the data's)")
    p.add_argument("--out", default=".", help="folder for report.json, report.md and report.png")
    p.add_argument("--max-batches", type=_positive, help=f"use at most this many batches of {REPORT_BATCH} samples "
                                                         "(default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    _add_progress(p)
    p.set_defaults(func=cmd_report)

    p = command("prune", "unstructured pruning by a rescaling-invariant criterion (or magnitude); saves the pruned "
                         "state dict and prints the certified distance to the original")
    _add_model(p, dtype="float32", dtype_help="precision of the path-magnitude scores (the certified D is float64)")
    p.add_argument("--amount", type=_fraction, required=True, help="fraction of conv/linear weights to remove, in [0, 1]")
    p.add_argument("--criterion", choices=("auto",) + CRITERIA, default="auto",
                   help="score of a weight (README, 'Choosing a criterion'); auto: norm-matched on batch-norm "
                        "networks with a residual stream, else norm-balanced-lamp on batch-norm networks, else "
                        "wanda-lamp with --calibration, else balanced-fan")
    p.add_argument("--calibration", metavar="DATA", help="inputs for the data-aware criteria, as report's --data: "
                                                         "cifar10-sample, cifar10-train, cifar10-test or a .pt file")
    p.add_argument("--calibration-batches", type=_positive, default=4,
                   help=f"use the first N batches of {REPORT_BATCH} calibration samples (default: 4)")
    p.add_argument("--scope", choices=["global", "local"], default="global",
                   help="rank the scores over all weights together, or per tensor")
    p.add_argument("--save", required=True, metavar="FILE", help="where to write the pruned state dict")
    _add_progress(p)
    p.set_defaults(func=cmd_prune)

    p = command("demo", "the main job: prune the packaged CIFAR-10 ResNet-20, certify, attack, report")
    p.add_argument("--out", default="out/demo", help="folder for the tables, plot and report")
    p.add_argument("--limit", type=_positive, help=f"use only the first N of the {DEMO_IMAGES:,} packaged images "
                                                   "(default: all)")
    _add_progress(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (PathSaliencyError, ValueError, OSError) as exc:  # bad input; FileNotFoundError is an OSError
        print(f"pathsaliency: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
