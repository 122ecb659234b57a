"""The report's plots from numbers alone: every plot writes a PNG (an empty one says why), the bytes axis shows every
method, and the Pareto front keeps only the points nothing beats."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from experiments import plots  # noqa: E402
from experiments.plots import CostPoint, ReliabilityBins, _bytes_axis, pareto_front  # noqa: E402
from experiments.stats import Effect  # noqa: E402


def effect(estimate: float, half_width: float = 0.02) -> Effect:
    return Effect(estimate, estimate - half_width, estimate + half_width, 0.01, 3, 1200, 2000)


def test_positive_byte_counts_get_a_log_axis_that_contains_them():
    figure, axes = plt.subplots()
    _bytes_axis(axes, [6.5e4, 8.4e5, 4.4e6])
    left, right = axes.get_xlim()
    assert axes.get_xscale() == "log" and left < 6.5e4 and right > 4.4e6 and left > 0
    plt.close(figure)


def test_a_method_that_sent_nothing_keeps_the_axis_from_zero_without_negative_bytes():
    figure, axes = plt.subplots()
    _bytes_axis(axes, [0.0, 3.7e5, 4.4e6])
    left, right = axes.get_xlim()
    assert axes.get_xscale() == "symlog" and left == 0 and right > 4.4e6
    plt.close(figure)


def test_the_pareto_front_keeps_the_points_that_no_cheaper_point_beats():
    points = [
        CostPoint("local_only", 0.0, effect(0.80)),
        CostPoint("ffa_lora", 5e4, effect(0.78)),
        CostPoint("med_duallora", 2e5, effect(0.86)),
        CostPoint("fedit", 2e5, effect(0.84)),
        CostPoint("fedavg_full", 4e6, effect(0.85)),
    ]
    assert [point.method for point in pareto_front(points)] == ["local_only", "med_duallora"]


CASES = {
    "sweep": (plots.delta_against_h, {"a − b": [(0.0, effect(0.0)), (1.0, effect(0.04)), (0.5, effect(0.02))]}),
    "forest": (plots.forest, {"primary": [("a − b @ ge", effect(0.03))], "positive control": []}),
    "bytes": (
        plots.auroc_against_bytes,
        [
            CostPoint("centralized", None, effect(0.9)),
            CostPoint("local_only", 0.0, effect(0.8)),
            CostPoint("fedit", 2e5, effect(0.85)),
        ],
    ),
    "rounds": (plots.validation_curves, {"fedit": {0: 0.5, 1: 0.7, 2: 0.8}}),
    "reliability": (
        plots.reliability,
        {"ge": {"fedit": ReliabilityBins([0.1, 0.5, 0.9], [0.0, 0.6, 1.0], [5, 3, 7])}},
    ),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("empty", [False, True])
def test_each_plot_writes_a_png_with_or_without_data(tmp_path, name, empty):
    draw, data = CASES[name]
    path = draw(tmp_path / f"{name}.png", type(data)() if empty else data)
    assert path == tmp_path / f"{name}.png" and path.read_bytes().startswith(b"\x89PNG")
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed
    assert not plt.get_fignums()  # every figure closed
