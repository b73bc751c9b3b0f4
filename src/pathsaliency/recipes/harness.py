"""What every recipe runs through: a config dataclass turned into a command line, rank agreement between
the certificate and accuracy, plots (the bound check itself is the core's :mod:`pathsaliency.bound`).

* :func:`parser` / :func:`parse` -- one ``--option`` per dataclass field (help text and default from the
  field), so a recipe is ``run(parse(Config, argv))`` and tests build ``Config(...)`` directly.
* :func:`spearman` -- Spearman's rank correlation (average ranks for ties).
* :func:`figure` -- a matplotlib figure written to a file when its ``with`` block ends.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import typing

import torch


def parser(config_cls, prog: str, description: str, choices: dict | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one ``--field-name`` per field of the dataclass ``config_cls``: tuples
    become ``nargs="+"``, a bool ``x`` defaulting to True becomes ``--no-x``, help text comes from the
    field's ``metadata["help"]``, a field without a default is a required option; ``choices`` maps field
    names to their allowed values."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} ({'required' if required else f'default: {default}'})".strip()
        kind = hints[f.name]
        if kind is bool:
            if default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                               help=f"do not: {f.metadata.get('help', f.name)} (done by default)")
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if optional else kind
        extra = {"choices": choices[f.name]} if choices and f.name in choices else {}
        extra["required"] = required
        if typing.get_origin(base) is tuple:
            p.add_argument(flag, dest=f.name, nargs="+", type=typing.get_args(base)[0], default=default,
                           help=help_text, **extra)
        else:
            p.add_argument(flag, dest=f.name, type=base, default=default, help=help_text, **extra)
    return p


def parse(config_cls, argv=None, **parser_kw):
    """``config_cls`` filled from the command line ``argv`` (see :func:`parser`)."""
    ns = parser(config_cls, **parser_kw).parse_args(argv)
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()})


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences (average ranks for ties); nan when
    either is constant or shorter than 2."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def _ranks(v):
    order = v.argsort()
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    for value in v.unique():  # average the ranks of ties
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


@contextlib.contextmanager
def figure(path, nrows: int = 1, ncols: int = 1, *, size=(8, 5.5), dpi: int = 120):
    """``(fig, axes)``: a matplotlib figure (Agg backend) with an ``nrows x ncols`` array of axes, written to
    ``path`` (tight layout, ``dpi``) when the ``with`` block ends, and closed in any case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
