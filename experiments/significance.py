"""Paired Wilcoxon signed-rank test over (seed, site) pairs (the benchmark's secondary column), Holm's adjustment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_NONZERO_PAIRS = 6
"""With n non-zero differences the smallest two-sided p-value is 2 / 2**n; n = 6 is the first that can reach 0.05."""
EXACT_MAX_PAIRS = 50
PERMUTATION_MAX_PAIRS = 13
DIFFERENCE_DECIMALS = 12
"""Differences are rounded so that float noise (0.9 - 0.8 vs 0.8 - 0.7) neither breaks ties nor hides zeros."""


@dataclass(frozen=True)
class PairedTest:
    """Outcome of one paired comparison; `p_value` is NaN when no test was run, and `note` says why."""

    reference: str
    baseline: str
    n_pairs: int
    n_zero: int
    mean_difference: float
    median_difference: float
    statistic: float
    p_value: float
    p_holm: float
    test_method: str
    note: str


def paired_wilcoxon(reference: str, baseline: str, differences: Sequence[float]) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test on `reference - baseline` differences.

    Zero differences are dropped (Wilcoxon's convention) and counted. The p-value is exact when the non-zero
    differences have no ties (n <= 50), an exhaustive permutation over sign flips with ties (n <= 13), otherwise the
    normal approximation with tie correction. Fewer than MIN_NONZERO_PAIRS non-zero differences give no p-value.
    """
    rounded = np.round(np.asarray(differences, dtype=np.float64), DIFFERENCE_DECIMALS)
    if not np.isfinite(rounded).all():
        raise ValueError(f"{reference} vs {baseline}: differences must be finite, got {rounded.tolist()}")
    nonzero = rounded[rounded != 0]
    n_zero = int(rounded.size - nonzero.size)
    mean_difference = float(rounded.mean()) if rounded.size else math.nan
    median_difference = float(np.median(rounded)) if rounded.size else math.nan

    def outcome(statistic: float, p_value: float, test_method: str, note: str) -> PairedTest:
        return PairedTest(
            reference=reference,
            baseline=baseline,
            n_pairs=int(rounded.size),
            n_zero=n_zero,
            mean_difference=mean_difference,
            median_difference=median_difference,
            statistic=statistic,
            p_value=p_value,
            p_holm=p_value,
            test_method=test_method,
            note=note,
        )

    zero_note = f"{n_zero} zero difference(s) dropped" if n_zero else ""
    if rounded.size and nonzero.size == 0:
        return outcome(math.nan, math.nan, "none", f"all {rounded.size} pairs equal: no difference to test")
    if nonzero.size < MIN_NONZERO_PAIRS:
        reason = f"too few non-zero pairs ({nonzero.size} < {MIN_NONZERO_PAIRS}): p could not reach 0.05"
        return outcome(math.nan, math.nan, "none", "; ".join(filter(None, [reason, zero_note])))

    has_ties = np.unique(np.abs(nonzero)).size < nonzero.size
    if not has_ties and nonzero.size <= EXACT_MAX_PAIRS:
        test_method, scipy_method = "exact", "exact"
    elif has_ties and nonzero.size <= PERMUTATION_MAX_PAIRS:
        test_method, scipy_method = "exact permutation (ties)", stats.PermutationMethod(n_resamples=np.inf)
    else:
        test_method, scipy_method = "normal approx." + (" (tie-corrected)" if has_ties else ""), "asymptotic"
    result = stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method=scipy_method)
    return outcome(float(result.statistic), float(result.pvalue), test_method, zero_note)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjustment; NaN entries (tests not run) stay NaN and do not count as tests."""
    tested = sorted((p, index) for index, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running_max = 0.0
    for rank, (p, index) in enumerate(tested):
        running_max = max(running_max, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running_max
    return adjusted
