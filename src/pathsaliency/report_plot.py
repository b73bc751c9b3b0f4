"""``plot_report``: a robustness report as a PNG (needs matplotlib).

Left: the certified distance of each changed layer alone (log scale; blue: exact, case 1; orange: upper
bound, case 2) against the whole model's ``D``. Right: the certified bound on ``||R_theta(x) -
R_theta'(x)||_1`` next to the observed max and mean deviation of the weights-only model and, hatched and
marked not certified, the full model's. Values beyond float64 are drawn as log10 on a linear axis.
"""
from __future__ import annotations

import math

_RECIPES_HINT = "pip install 'pathsaliency[recipes]'"
RIGHT_PANEL_IN = 3.4  # width of the whole-model panel, inches


def plot_report(report, path) -> None:
    """Write :func:`report_figure` of ``report`` to ``path`` (PNG, 100 dpi)."""
    import matplotlib.pyplot as plt

    fig = report_figure(report)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_figure(report):
    """The matplotlib figure: per-layer certified distance (log scale) next to the observed deviation
    and the certified bound of the whole model."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"RobustnessReport.plot needs matplotlib: {_RECIPES_HINT}") from exc
    layers = report.layers or []
    big = [l.distance for l in layers] + [report.distance, report.certified_bound]
    as_log10 = not all(math.isfinite(v) for v in big)  # beyond float64: plot log10 on a linear axis

    def val(v, log10):
        return log10 if as_log10 else v

    left = max(3.6, 0.35 * len(layers))  # inches; the right panel keeps its own width so its title fits
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(left + RIGHT_PANEL_IN + 2.0, 6.0),
                                   gridspec_kw={"width_ratios": [left, RIGHT_PANEL_IN]})
    unit = "log10 " if as_log10 else ""
    if layers:
        ax1.bar(range(len(layers)), [val(l.distance, l.log10_distance) for l in layers], width=0.7,
                color=["tab:blue" if l.exact else "tab:orange" for l in layers])
        ax1.set_xticks(range(len(layers)))
        ax1.set_xticklabels([l.name for l in layers], rotation=90, fontsize=7)
        if report.distance > 0:
            ax1.axhline(val(report.distance, report.log10_distance), color="k", ls="--", lw=1,
                        label="whole model D")
            ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "per-layer breakdown not computed" if report.layers is None else "no layer changed",
                 ha="center", va="center", transform=ax1.transAxes)
    positive = [l.distance for l in layers if l.distance > 0]
    if not as_log10 and positive:
        ax1.set_yscale("log")
        ax1.set_ylim(bottom=min(positive) / 10)
    ax1.set_xlabel("layer (only this layer compressed; blue: exact, orange: upper bound)")
    ax1.set_ylabel(f"{unit}certified distance D")
    ax1.set_title("Per-layer certified distance")

    names = ["certified\nbound", "observed\nmax", "observed\nmean"]
    values = [report.certified_bound, report.observed_max, report.observed_mean]
    logs = [report.log10_certified_bound, _log10(report.observed_max), _log10(report.observed_mean)]
    colors = ["tab:green", "tab:blue", "tab:cyan"]
    if report.full_model:
        names += ["full model\nmax (not\ncertified)"]
        values += [report.full_observed_max]
        logs += [_log10(report.full_observed_max)]
        colors += ["tab:red"]
    heights = [val(v, lg) for v, lg in zip(values, logs)]
    bars = ax2.bar(range(len(names)), heights, color=colors)
    if report.full_model:
        bars[-1].set_hatch("//")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, fontsize=7)
    if not as_log10 and any(v > 0 for v in values):
        ax2.set_yscale("log")
    ax2.set_ylabel(f"{unit}‖R_θ(x) − R_θ'(x)‖₁")
    ax2.set_title(f"Whole model\n(observed / certified ≤ {report.observed_to_certified:.2g} per sample)", fontsize=10)
    fig.suptitle(f"Robustness report{': ' + report.name if report.name else ''}\n"
                 f"D/‖Φ(θ)‖₁ = {report.relative_distance:.3g} ({'exact' if report.exact else 'upper bound'})")
    fig.tight_layout()
    return fig


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 else -math.inf
