"""Paired Wilcoxon tests and Holm adjustment checked against values computed by hand."""

import math

import pytest

from experiments.significance import holm_adjust, paired_wilcoxon


def test_exact_p_when_all_six_differences_favour_the_reference():
    # Every sign pattern of 6 distinct ranks is equally likely: only all-plus and all-minus are as extreme -> 2/64.
    test = paired_wilcoxon("ref", "base", [0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert test.statistic == 0.0
    assert test.p_value == pytest.approx(2 / 64)
    assert test.test_method == "exact"
    assert test.mean_difference == pytest.approx(0.035)


def test_tied_ranks_use_exhaustive_permutation():
    # |d| ranks 1.5, 1.5, 3, 4, 5, 6; W- = 6. Subsets of ranks summing to <= 6: 13 of 64, two-sided 26/64.
    test = paired_wilcoxon("ref", "base", [1, 1, 2, 3, 4, -5])
    assert test.statistic == 6.0
    assert test.p_value == pytest.approx(26 / 64)
    assert test.test_method == "exact permutation (ties)"


def test_float_noise_does_not_break_ties():
    # 0.9 - 0.8 and 0.8 - 0.7 differ in the last bits; they must still be one tie, as in the integer case above.
    differences = [0.9 - 0.8, 0.8 - 0.7, 0.2, 0.3, 0.4, -0.5]
    test = paired_wilcoxon("ref", "base", differences)
    assert test.p_value == pytest.approx(26 / 64)


def test_zero_differences_are_dropped_and_reported():
    test = paired_wilcoxon("ref", "base", [0.0, 0.0, 1, 2, 3, 4, 5, 6])
    assert (test.n_pairs, test.n_zero) == (8, 2)
    assert test.p_value == pytest.approx(2 / 64)
    assert "2 zero difference(s) dropped" in test.note


def test_too_few_pairs_gives_no_p_value():
    test = paired_wilcoxon("ref", "base", [0.1, 0.2, 0.3, 0.4, 0.5])
    assert math.isnan(test.p_value)
    assert "too few non-zero pairs (5 < 6)" in test.note


def test_all_equal_pairs_give_no_p_value():
    test = paired_wilcoxon("ref", "base", [0.0] * 12)
    assert math.isnan(test.p_value)
    assert "all 12 pairs equal" in test.note


def test_normal_approximation_beyond_permutation_size():
    # 14 differences, ranks 1..14 with one tie (1.5, 1.5); W- = rank of -3 = 3.
    differences = [1, 1, -3] + list(range(4, 15))
    mean = 14 * 15 / 4
    variance = 14 * 15 * 29 / 24 - (2**3 - 2) / 48
    z = (3 - mean) / math.sqrt(variance)
    expected = math.erfc(abs(z) / math.sqrt(2))
    test = paired_wilcoxon("ref", "base", differences)
    assert test.test_method == "normal approx. (tie-corrected)"
    assert test.p_value == pytest.approx(expected, rel=1e-9)


def test_holm_adjustment_by_hand():
    # Sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04); NaN stays out.
    assert holm_adjust([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)
