"""The benchmark's figures, each drawn from numbers the report computed (never from records) and saved atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.stats import Effect  # noqa: E402
from models.atomic_io import atomic_path  # noqa: E402

DPI = 120
COLORS = plt.get_cmap("tab20").colors
"""One colour per method, up to 20."""


@dataclass(frozen=True)
class CostPoint:
    """A method's mean-over-sites AUROC and its uplink bytes per client per round (None: nothing federated)."""

    method: str
    bytes_per_round: float | None
    auroc: Effect


@dataclass(frozen=True)
class ReliabilityBins:
    """The non-empty bins of a reliability diagram: mean P(diseased), share diseased and subjects, per bin."""

    mean_score: Sequence[float]
    share_diseased: Sequence[float]
    count: Sequence[int]


def save(figure: Figure, path: Path) -> Path:
    """Write the figure as PNG under a temporary name, then rename it to `path`; the figure is closed."""
    try:
        with atomic_path(path, suffix=".png") as temporary:
            figure.savefig(temporary, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return path


def delta_against_h(path: Path, curves: Mapping[str, Sequence[tuple[float, Effect]]]) -> Path:
    """ΔAUROC (mean over sites) against heterogeneity h, one line per comparison with its 95 % interval band."""
    figure, axes = plt.subplots(figsize=(8.0, 5.0))
    drawn = {label: sorted(points, key=lambda point: point[0]) for label, points in curves.items() if points}
    for color, (label, points) in zip(COLORS[::2], drawn.items(), strict=False):
        hs = [h for h, _ in points]
        axes.plot(hs, [effect.estimate for _, effect in points], marker="o", color=color, label=label)
        lows, highs = [effect.low for _, effect in points], [effect.high for _, effect in points]
        axes.fill_between(hs, lows, highs, color=color, alpha=0.2, linewidth=0)
    axes.axhline(0, color="grey", linewidth=1)
    axes.set_xlabel("vendor heterogeneity h (0: every site renders like Siemens; 1: the real profiles)")
    axes.set_ylabel("ΔAUROC, mean over sites (95 % interval)")
    axes.set_title("Personalisation's gain against heterogeneity")
    _finish(axes, drawn, "no sweep or headline records yet", beside=False)
    return save(figure, path)


def forest(path: Path, panels: Mapping[str, Sequence[tuple[str, Effect]]]) -> Path:
    """One panel per family of comparisons: each row an effect with its 95 % interval, 0 marked."""
    rows = max([len(effects) for effects in panels.values()] + [1])
    figure, axes_list = plt.subplots(
        1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 1.5 + 0.28 * rows), squeeze=False
    )
    for axes, (title, effects) in zip(axes_list[0], panels.items(), strict=False):
        positions = range(len(effects))[::-1]
        for position, (_, effect) in zip(positions, effects, strict=True):
            axes.plot([effect.low, effect.high], [position, position], color="black", linewidth=1.2)
            axes.plot([effect.estimate], [position], "s", color="tab:blue", markersize=4)
        axes.set_yticks(list(positions), [label for label, _ in effects], fontsize="x-small")
        axes.axvline(0, color="grey", linewidth=1, linestyle="--")
        axes.set_xlabel("ΔAUROC (95 % hierarchical-bootstrap interval)")
        axes.set_title(title, fontsize="small")
        if not effects:
            _no_data(axes, "not run yet")
    if not panels:
        _no_data(axes_list[0][0], "no effects computed yet")
    figure.tight_layout()
    return save(figure, path)


def auroc_against_bytes(
    path: Path, points: Sequence[CostPoint], title: str = "AUROC against communication (headline, h = 1)"
) -> Path:
    """AUROC (mean over sites, 95 % interval) against uplink bytes per client per round, the Pareto front joined; a
    method that federates nothing is a dashed line across the plot."""
    figure, axes = plt.subplots(figsize=(9.0, 4.8))
    sent = [point for point in points if point.bytes_per_round is not None]
    for color, point in zip(COLORS, points, strict=False):
        auroc = point.auroc
        if point.bytes_per_round is None:
            axes.axhline(auroc.estimate, color=color, linestyle="--", label=f"{point.method} (no federation)")
            axes.axhspan(auroc.low, auroc.high, color=color, alpha=0.1, linewidth=0)
            continue
        error = [[auroc.estimate - auroc.low], [auroc.high - auroc.estimate]]
        axes.errorbar(
            [point.bytes_per_round], [auroc.estimate], yerr=error, fmt="o", capsize=3, color=color, label=point.method
        )
    front = pareto_front(sent)
    if front:
        xs = [point.bytes_per_round for point in front]
        axes.plot(xs, [point.auroc.estimate for point in front], color="grey", linewidth=1, label="Pareto front")
    _bytes_axis(axes, [point.bytes_per_round for point in sent])
    axes.set_ylabel("AUROC, mean over sites (95 % interval)")
    axes.set_title(title)
    _finish(axes, points, "no records yet")
    return save(figure, path)


def pareto_front(points: Sequence[CostPoint]) -> list[CostPoint]:
    """The points no other point beats on both counts (fewer or equal bytes and a higher AUROC), by bytes."""
    front: list[CostPoint] = []
    for point in sorted(points, key=lambda point: (point.bytes_per_round, -point.auroc.estimate)):
        if not front or point.auroc.estimate > front[-1].auroc.estimate:
            front.append(point)
    return front


def _bytes_axis(axes: Axes, plotted: Sequence[float]) -> None:
    """Log x axis over the plotted byte counts (symlog from 0 when a method sent nothing), half a decade of margin."""
    label = "uplink bytes per client per round"
    positive = [value for value in plotted if value > 0]
    if not positive:
        axes.set_xlabel(label)
        return
    right = max(positive) * 3
    if len(positive) == len(plotted):
        axes.set_xscale("log")
        axes.set_xlim(min(positive) / 3, right)
        axes.set_xlabel(f"{label} (log scale)")
    else:
        axes.set_xscale("symlog", linthresh=min(positive) / 3)
        axes.set_xlim(0, right)
        axes.set_xlabel(f"{label} (symlog scale: linear below the smallest, 0 = nothing sent)")


def validation_curves(path: Path, curves: Mapping[str, Mapping[int, float]]) -> Path:
    """Validation AUROC per round (mean over sites and seeds), one line per method."""
    figure, axes = plt.subplots(figsize=(9.0, 4.5))
    for color, (method, per_round) in zip(COLORS, curves.items(), strict=False):
        rounds = sorted(per_round)
        axes.plot(rounds, [per_round[index] for index in rounds], marker="o", color=color, label=method)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round (each site validates the model it received, before local training)")
    axes.set_ylabel("validation AUROC\n(mean over sites and seeds)")
    axes.set_title("Validation AUROC per round (headline, h = 1)")
    _finish(axes, curves, "no per-round validation metrics yet")
    return save(figure, path)


def reliability(path: Path, diagrams: Mapping[str, Mapping[str, ReliabilityBins]]) -> Path:
    """Reliability diagrams, one panel per site (`diagrams[site][method]`), the diagonal as perfect calibration."""
    sites = list(diagrams) or ["no site"]
    figure, axes_list = plt.subplots(1, len(sites), figsize=(3.6 * len(sites), 4.0), squeeze=False)
    for axes, site in zip(axes_list[0], sites, strict=True):
        axes.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--")
        for color, (method, bins) in zip(COLORS[::2], diagrams.get(site, {}).items(), strict=False):
            axes.plot(bins.mean_score, bins.share_diseased, marker="o", markersize=3, color=color, label=method)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_aspect("equal")
        axes.set_xlabel("mean P(diseased) in the bin")
        axes.set_title(site, fontsize="small")
    axes_list[0][0].set_ylabel("share diseased in the bin")
    _finish(axes_list[0][-1], diagrams, "no headline records yet")
    return save(figure, path)


def _finish(axes: Axes, data: object, empty_message: str, beside: bool = True) -> None:
    """A legend (beside the axes, or below them for long labels) when something was drawn, else a note saying why
    the plot is empty."""
    if not data:
        _no_data(axes, empty_message)
    if axes.get_legend_handles_labels()[0]:
        if beside:
            axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    axes.figure.tight_layout()


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="grey")
