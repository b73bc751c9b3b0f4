"""The ``pathsaliency`` command."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import path_metric, path_norm
from .errors import PathSaliencyError
from .zoo import default_input_shape, load_model


def _shape(text):
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v)


def _add_model(p, name="model", help_text="the model"):
    p.add_argument(name, help=f"{help_text}: torchvision:<name>, cifar:resnet20|resnet32, or <module>:<function>")


def _add_common(p):
    p.add_argument("--checkpoint", help="weights to load (torch.load with weights_only=True)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that holds pickled code (runs that code: only for files you trust)")
    p.add_argument("--pretrained", action="store_true", help="torchvision: load the default pretrained weights (internet)")
    p.add_argument("--input-shape", type=_shape, help="shape of one input sample, e.g. 3,224,224")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--json", action="store_true", help="print JSON")


def _input_shape(args, spec):
    shape = args.input_shape or default_input_shape(spec)
    if shape is None:
        raise SystemExit(f"error: give --input-shape for {spec}")
    return shape


def cmd_norm(args):
    model = load_model(args.model, args.checkpoint, args.trust_checkpoint, args.pretrained)
    dtype = getattr(torch, args.dtype or "float32")
    result = path_norm(model, _input_shape(args, args.model), q=args.q, dtype=dtype)
    record = {"model": args.model, "input_shape": list(_input_shape(args, args.model)), "q": args.q,
              "log10_path_norm": result.log10, "path_norm": result.value}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{args.model}: l{args.q} path-norm = {result.value:.6g} (log10 = {result.log10:.6f})")


def cmd_metric(args):
    a = load_model(args.model, args.checkpoint, args.trust_checkpoint, args.pretrained)
    b = load_model(args.model, args.other_checkpoint, args.trust_checkpoint, args.pretrained)
    dtype = getattr(torch, args.dtype or "float64")
    result = path_metric(a, b, _input_shape(args, args.model), dtype=dtype)
    record = {"model": args.model, "log10_distance": result.log10, "distance": result.value, "exact": result.exact,
              "relative": result.relative, "log10_path_norm": result.norm.log10}
    if args.json:
        print(json.dumps(record))
    else:
        kind = "exact" if result.exact else "certified upper bound"
        print(f"D = {result.value:.6g} (log10 = {result.log10:.6f}, {kind}); D / ||Phi|| = {result.relative:.3g}")


def _report_data(spec):
    """``--data`` of ``report``: the CIFAR-10 sample/test/train set or a .pt file holding a tensor, in
    batches of 250."""
    from pathlib import Path

    from torch.utils.data import DataLoader

    splits = {"cifar10-sample": ("test", "sample"), "cifar10-test": ("test", "auto"), "cifar10-train": ("train", "auto")}
    if spec in splits:
        split, source = splits[spec]
        try:
            from pathsaliency.recipes.cifar10 import cifar10
        except ImportError as exc:
            raise ValueError(f"--data {spec} needs the recipes extras: pip install 'pathsaliency[recipes]' ({exc})") from exc
        try:
            dataset = cifar10(split, source=source)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"--data {spec}: could not load the data set ({exc})") from exc
        return DataLoader(dataset, batch_size=250, shuffle=False)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--data {spec!r}: expected cifar10-sample, cifar10-test, cifar10-train or the path of a "
                         ".pt file holding a tensor of inputs")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many kinds
        raise ValueError(f"--data {spec}: could not be loaded with torch.load(weights_only=True) ({exc})") from exc
    labels = None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(torch.is_tensor(t) for t in obj):
        obj, labels = obj
    if not torch.is_tensor(obj) or obj.dim() < 2 or not obj.is_floating_point() or obj.shape[0] == 0:
        raise ValueError(f"--data {spec}: expected a non-empty floating-point tensor of inputs (batch first)")
    if labels is None:
        return [obj[i:i + 250] for i in range(0, obj.shape[0], 250)]
    return [(obj[i:i + 250], labels[i:i + 250]) for i in range(0, obj.shape[0], 250)]


def cmd_report(args):
    from pathlib import Path

    from .report import robustness_report
    from .zoo import load_checkpoint

    if not Path(args.compressed).is_file():
        raise FileNotFoundError(f"{args.compressed}: no such checkpoint file")
    data = _report_data(args.data)
    reference = load_model(args.reference, args.checkpoint, args.trust_checkpoint, args.pretrained)
    obj = load_checkpoint(args.compressed, args.trust_checkpoint)
    if isinstance(obj, torch.nn.Module):
        compressed = obj.eval()
    else:
        if not isinstance(obj, dict):
            raise ValueError(f"{args.compressed}: expected a state dict, got {type(obj).__name__}")
        compressed = load_model(args.reference, args.checkpoint, args.trust_checkpoint, args.pretrained)
        try:
            compressed.load_state_dict(obj)
        except RuntimeError as exc:
            raise ValueError(f"{args.compressed}: not a state dict of {args.reference} ({exc})") from exc
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError("--max-batches must be at least 1")
    report = robustness_report(reference, compressed, data, input_shape=args.input_shape,
                               max_batches=args.max_batches, name=f"{args.reference} vs {args.compressed}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    report.plot(out / "report.png")
    print(report.to_json() if args.json else report.to_markdown())


def cmd_prune(args):
    from .pruning import prune_unstructured

    model = load_model(args.model, args.checkpoint, args.trust_checkpoint, args.pretrained)
    shape = _input_shape(args, args.model)
    pruned, masks = prune_unstructured(model, args.amount, shape, criterion=args.criterion, scope=args.scope)
    torch.save(pruned.state_dict(), args.save)
    d = path_metric(model, pruned, shape)
    record = {"model": args.model, "criterion": args.criterion, "scope": args.scope, "amount": args.amount,
              "saved": args.save, "log10_distance": d.log10, "relative_distance": d.relative, "exact": d.exact}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"pruned {args.amount:.0%} of the weights of {args.model} by {args.criterion} ({args.scope}); saved to "
              f"{args.save}; certified D = {d.value:.6g} (D / ||Phi|| = {d.relative:.3g}, exact)")


def cmd_demo(args):
    try:
        from .recipes.demo import run_demo
    except ImportError as exc:
        raise SystemExit(f"pathsaliency demo needs the recipes extra ({exc}): pip install 'pathsaliency[recipes]'")
    run_demo(args.out, args.limit, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathsaliency", description=__doc__.strip())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("norm", help="the l1 path-norm of a model")
    _add_model(p)
    _add_common(p)
    p.add_argument("--q", type=float, default=1)
    p.set_defaults(func=cmd_norm)

    p = sub.add_parser("metric", help="the certified path-metric between two checkpoints of one architecture")
    _add_model(p)
    _add_common(p)
    p.add_argument("other_checkpoint", help="the second checkpoint (same architecture)")
    p.set_defaults(func=cmd_metric)

    p = sub.add_parser("report", help="robustness report of a compressed checkpoint: certified bound vs observed "
                                      "deviation on data (report.json, report.md, report.png)")
    p.add_argument("reference", help="the reference model: torchvision:<name>, cifar:resnet20|resnet32, or "
                                     "<module>:<function>")
    p.add_argument("compressed", help="checkpoint of the compressed model (a state dict of the same architecture)")
    p.add_argument("--data", required=True,
                   help="cifar10-sample (packaged 1,000 images), cifar10-test, cifar10-train, or a .pt file holding "
                        "a tensor of inputs")
    p.add_argument("--checkpoint", help="weights of the reference model (torch.load with weights_only=True)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that hold pickled code (runs that code: only for files you trust)")
    p.add_argument("--pretrained", action="store_true", help="torchvision: load the default pretrained weights (internet)")
    p.add_argument("--input-shape", type=_shape, help="shape of one input sample (default: the data's)")
    p.add_argument("--out", default=".", help="folder for report.json, report.md and report.png (default: .)")
    p.add_argument("--max-batches", type=int, help="use at most this many batches of 250 samples")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("prune", help="unstructured pruning by path-magnitude (or magnitude); saves the pruned weights")
    _add_model(p)
    _add_common(p)
    p.add_argument("--amount", type=float, required=True, help="fraction of conv/linear weights to remove")
    p.add_argument("--criterion", choices=["path-magnitude", "magnitude"], default="path-magnitude")
    p.add_argument("--scope", choices=["global", "local"], default="global")
    p.add_argument("--save", required=True, help="where to write the pruned state dict")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("demo", help="the main job: prune the packaged CIFAR-10 ResNet-20, certify, attack, report")
    p.add_argument("--out", default="out/demo", help="folder for the tables, plot and report")
    p.add_argument("--limit", type=int, help="use only the first N of the 1,000 packaged images")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (PathSaliencyError, ValueError, FileNotFoundError) as exc:
        print(f"pathsaliency: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
