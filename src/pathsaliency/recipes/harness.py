"""What every recipe runs through: a config dataclass turned into a command line, rank agreement between
the certificate and accuracy, and the figure boilerplate (the bound check itself is the core's
:mod:`pathsaliency.bound`, tables are :func:`pathsaliency.recipes.common.write_table`).

* :func:`parser` / :func:`parse` -- one ``--option`` per dataclass field (help text and default from the
  field), so a recipe is ``run(parse(Config, argv))`` and tests build ``Config(...)`` directly;
  :func:`main` is that line (plus ``torch.set_num_threads`` for a config with a ``threads`` field).
* :func:`spearman` -- Spearman's rank correlation (average ranks for ties); :func:`rank_agreement` -- its
  Markdown table per level (model and sparsity, model and MACs removed, ...).
* :func:`figure` / :func:`label` / :func:`save` -- a grid of axes on the Agg backend, one call to title,
  label, grid and legend an axis, one to write the figure without clipping its titles or legends.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

import torch


def parser(config_cls, prog: str, description: str, choices: dict | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one ``--field-name`` per field of the dataclass ``config_cls``: tuples
    become ``nargs="+"``, a bool ``x`` defaulting to True becomes ``--no-x``, help text comes from the
    field's ``metadata["help"]``; ``choices`` maps field names to their allowed values."""
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


def main(config_cls, run, argv=None, **parser_kw):
    """``run(parse(config_cls, argv, **parser_kw))``; a config with a ``threads`` field (intra-op threads,
    None: torch's choice) sets ``torch.set_num_threads`` first. Returns what ``run`` returns."""
    config = parse(config_cls, argv, **parser_kw)
    if getattr(config, "threads", None):
        torch.set_num_threads(config.threads)
    return run(config)


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


def rank_agreement(rows, by, scores, accuracy="top1", formats=None) -> str:
    """Markdown: for each level (rows sharing the values of the columns ``by``, in order of appearance),
    Spearman's rho between each column of ``scores`` and the accuracy drop ``-row[accuracy]`` over that
    level's rows (1: the column orders the rows exactly as the accuracy drop does). ``formats`` maps a
    column of ``by`` to a format string."""
    formats = formats or {}
    lines = ["| " + " | ".join(list(by) + ["rows"] + [f"rho({s})" for s in scores]) + " |",
             "|" + "|".join("---" for _ in range(len(by) + 1 + len(scores))) + "|"]
    for level in dict.fromkeys(tuple(r[k] for k in by) for r in rows):
        group = [r for r in rows if tuple(r[k] for k in by) == level]
        drop = [-r[accuracy] for r in group]
        cells = [format(v, formats[k]) if k in formats else str(v) for k, v in zip(by, level)]
        cells += [str(len(group))] + [f"{spearman([r[s] for r in group], drop):.2f}" for s in scores]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(nrows=1, ncols=1, panel=(5.2, 4.0)):
    """``(fig, axes)``: an ``nrows x ncols`` grid of axes (always 2-D), each ``panel`` inches, on the Agg
    backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False)


def label(ax, title, xlabel, ylabel, legend=True):
    """Title, axis labels, a light grid (major and minor ticks) and, when something is labelled, a small
    legend at its best place."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def save(fig, path, title=None, dpi=120):
    """Write ``fig`` to ``path`` with the overall ``title`` and close it; the bounding box grows to hold
    every title, label and legend (none is clipped)."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
