"""The bytes plot's x axis shows every method, whether or not one of them sent nothing."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.report import _bytes_axis  # noqa: E402


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
