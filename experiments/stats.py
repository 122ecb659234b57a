"""Hierarchical-bootstrap effects with intervals, secondary metrics and Hanley-McNeil power figures for the report."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from experiments.significance import holm_adjust
from models.metrics import DEFAULT_THRESHOLD

Metric = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""`metric(labels, scores)`: 0/1 labels broadcasting against P(diseased) scores, subjects on the last axis; one
value per leading index. Bind a threshold with functools.partial(sensitivity, threshold=t)."""

CONFIDENCE = 0.95
N_BOOT = 2000
ECE_BINS = 10
MIN_GAP = 0.01
"""Gap closure: a ratio whose denominator (reference - global, in metric units) is smaller in size is undefined."""
MAX_UNDEFINED_SHARE = 0.05
"""Gap closure: with more undefined replicates than this share, the gap is too small for an interval."""


@dataclass(frozen=True)
class Effect:
    """A point estimate with its 95 % percentile-bootstrap interval [low, high], its two-sided bootstrap p-value
    (NaN where nothing is tested), what it rests on, and `p_holm` once its family is adjusted (`holm_effects`)."""

    estimate: float
    low: float
    high: float
    p_value: float
    n_seeds: int
    n_subjects: int
    n_boot: int
    p_holm: float = math.nan


# ---- metrics: vectorised over leading axes, subjects on the last; NaN where a needed class is missing ----


def auroc(labels: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Mann-Whitney AUROC, a tied (diseased, healthy) pair counting one half: torchmetrics' binary_auroc."""
    healthy, scores = np.broadcast_arrays(np.asarray(labels) == 0, np.asarray(scores, dtype=np.float64))
    order = np.argsort(scores, axis=-1)
    ordered = np.take_along_axis(scores, order, axis=-1)
    healthy = np.take_along_axis(healthy, order, axis=-1)
    healthy_so_far = np.cumsum(healthy, axis=-1)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(ordered.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    # healthy scores below each score's tie group, and up to the group's end; the average credits ties one half
    below = np.maximum.accumulate(np.where(starts, healthy_so_far - healthy, 0), axis=-1)
    up_to = np.flip(np.minimum.accumulate(np.flip(np.where(ends, healthy_so_far, scores.shape[-1]), -1), -1), -1)
    n_healthy = healthy.sum(axis=-1)
    n_diseased = scores.shape[-1] - n_healthy
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum((below + up_to) * ~healthy, axis=-1) / (2 * n_diseased * n_healthy)


def sensitivity(labels: ArrayLike, scores: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Share of diseased subjects called diseased, score > threshold (strictly, as models.metrics and torchmetrics).

    With a threshold per seed, pass the decisions (scores > thresholds[:, None] as 0/1) and the default threshold,
    as models.metrics.subject_metrics does; the same holds for `specificity` and `balanced_accuracy`.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    return _share(labels == 1, scores > threshold)


def specificity(labels: ArrayLike, scores: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Share of healthy subjects not called diseased (score <= threshold)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    return _share(labels == 0, scores <= threshold)


def balanced_accuracy(labels: ArrayLike, scores: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Mean of sensitivity and specificity at `threshold`."""
    return (sensitivity(labels, scores, threshold) + specificity(labels, scores, threshold)) / 2


def sensitivity_at_specificity(labels: ArrayLike, scores: ArrayLike, min_specificity: float = 0.8) -> np.ndarray:
    """The highest sensitivity whose specificity is at least `min_specificity`, at an ROC vertex (no interpolation).

    The decision stays score > t; t is the lowest threshold that reaches the specificity, the m-th smallest healthy
    score with m = ceil(min_specificity * n_healthy), so at most n_healthy - m healthy scores lie above it.
    """
    if not 0 < min_specificity <= 1:
        raise ValueError(f"min_specificity must lie in (0, 1], got {min_specificity}")
    labels, scores = np.broadcast_arrays(np.asarray(labels), np.asarray(scores, dtype=np.float64))
    healthy = labels == 0
    needed = np.ceil(np.round(min_specificity * healthy.sum(axis=-1), 9)).astype(np.int64)
    healthy_scores = np.sort(np.where(healthy, scores, np.inf), axis=-1)
    threshold = np.take_along_axis(healthy_scores, np.maximum(needed - 1, 0)[..., None], axis=-1)
    return np.where(needed > 0, _share(labels == 1, scores > threshold), np.nan)


def brier(labels: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Mean squared difference between P(diseased) and the 0/1 label."""
    return np.mean((np.asarray(scores, dtype=np.float64) - np.asarray(labels)) ** 2, axis=-1)


def expected_calibration_error(labels: ArrayLike, scores: ArrayLike, n_bins: int = ECE_BINS) -> np.ndarray:
    """Calibration of P(diseased) itself: |share diseased - mean score| per bin, weighted by the bin's subjects.

    Bins have equal width, k / n_bins <= score < (k + 1) / n_bins, the last one closed: torchmetrics'
    binary_calibration_error with norm "l1" (up to float rounding at bin edges).
    """
    labels, scores = np.broadcast_arrays(np.asarray(labels), np.asarray(scores, dtype=np.float64))
    bins = np.minimum((scores * n_bins).astype(np.int64), n_bins - 1)
    gaps = labels - scores
    return sum(np.abs(np.where(bins == k, gaps, 0.0).sum(axis=-1)) for k in range(n_bins)) / scores.shape[-1]


def _share(members: np.ndarray, hits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(members & hits, axis=-1) / np.sum(members, axis=-1)


# ---- hierarchical bootstrap: seeds with replacement, then the test subjects within each class ----


def paired_delta(
    labels: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    metric: Metric = auroc,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Effect:
    """Mean over seeds of metric(a) - metric(b), scores (n_seeds, n_subjects) aligned by subject, with interval and p.

    Each replicate resamples the seeds, then the subjects within each class; a and b and every resampled seed share
    the subjects (paired). The p-value is two-sided: 2 * min(share <= 0, share >= 0), each share (count + 1) /
    (n_boot + 1) so that it is never 0, at most 1 (so 1 when every replicate is 0).
    """
    labels, matrices = _checked(labels, scores_a, scores_b)
    points, replicates = _bootstrap(labels, matrices, metric, n_boot, seed)
    deltas = replicates[0] - replicates[1]
    return _effect(points[0] - points[1], deltas, matrices[0].shape, _bootstrap_p(deltas))


def metric_interval(
    labels: ArrayLike, scores: ArrayLike, metric: Metric = auroc, n_boot: int = N_BOOT, seed: int = 0
) -> Effect:
    """One method's seed-mean metric with its hierarchical-bootstrap interval; p_value is NaN (nothing tested)."""
    labels, matrices = _checked(labels, scores)
    points, replicates = _bootstrap(labels, matrices, metric, n_boot, seed)
    return _effect(points[0], replicates[0], matrices[0].shape, math.nan)


def worst_site_interval(
    sites: Sequence[tuple[ArrayLike, ArrayLike]], metric: Metric = auroc, n_boot: int = N_BOOT, seed: int = 0
) -> Effect:
    """Minimum over sites of the seed-mean metric, each site (labels, scores (n_seeds, n_subjects)) its own test set.

    A replicate resamples the seeds once for every site (seed s is one federated run) and each site's subjects
    independently, then takes the minimum; n_subjects counts all sites' subjects.
    """
    checked = [_checked(labels, scores) for labels, scores in sites]
    n_seeds = {matrices[0].shape[0] for _, matrices in checked}
    if len(n_seeds) != 1:
        raise ValueError(f"every site needs the same seeds, got seed counts {sorted(n_seeds)}")
    rng = np.random.default_rng(seed)
    seeds = _seed_draws(rng, n_seeds.pop(), n_boot)
    estimates, replicates = [], []
    for labels, (scores,) in checked:
        estimates.append(metric(labels, scores).mean())
        replicates.append(_replicates(labels, scores, metric, seeds, _subject_draws(rng, labels, n_boot)))
    n_subjects = sum(labels.size for labels, _ in checked)
    return _effect(min(estimates), np.min(replicates, axis=0), (seeds.shape[1], n_subjects), math.nan)


def gap_closure(
    labels: ArrayLike,
    personalised: ArrayLike,
    global_: ArrayLike,
    reference: ArrayLike,
    metric: Metric = auroc,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Effect:
    """(personalised - global) / (reference - global) of seed-mean metrics, the three (n_seeds, n_subjects) score
    matrices on the same test hearts (reference: the global model on their Siemens-profile rendering).

    Replicates resample seeds and subjects jointly for the three. A ratio whose |denominator| < MIN_GAP is
    undefined: the estimate is then NaN; undefined replicates are left out (n_boot counts those kept), and with more
    than MAX_UNDEFINED_SHARE of them the interval is NaN too. p_value is NaN.
    """
    labels, matrices = _checked(labels, personalised, global_, reference)
    points, replicates = _bootstrap(labels, matrices, metric, n_boot, seed)
    ratios = _gap_ratio(replicates)
    kept = ratios[np.isfinite(ratios)]
    estimate = float(_gap_ratio(points))
    if kept.size < (1 - MAX_UNDEFINED_SHARE) * n_boot:
        return Effect(estimate, math.nan, math.nan, math.nan, *matrices[0].shape, kept.size)
    return _effect(estimate, kept, matrices[0].shape, math.nan)


def holm_effects(effects: Sequence[Effect]) -> list[Effect]:
    """The family's effects with `p_holm` (experiments.significance.holm_adjust; NaN p-values stay out)."""
    adjusted = holm_adjust([effect.p_value for effect in effects])
    return [replace(effect, p_holm=p_holm) for effect, p_holm in zip(effects, adjusted, strict=True)]


def _checked(labels: ArrayLike, *score_matrices: ArrayLike) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be a vector of 0 and 1, got shape {labels.shape}")
    if labels.all() or not labels.any():
        raise ValueError("the test set needs both healthy (0) and diseased (1) subjects")
    matrices = [np.asarray(scores, dtype=np.float64) for scores in score_matrices]
    for scores in matrices:
        if scores.ndim != 2 or scores.shape[1] != labels.size or scores.shape != matrices[0].shape:
            raise ValueError(f"scores must all be (n_seeds, {labels.size}), got {[m.shape for m in matrices]}")
        if not np.isfinite(scores).all():
            raise ValueError("scores must be finite")
    return labels.astype(np.int64), matrices


def _bootstrap(
    labels: np.ndarray, matrices: Sequence[np.ndarray], metric: Metric, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seed-mean metric of each matrix on the data (k,) and in each replicate (k, n_boot), the replicate's seeds and
    subjects shared by all matrices."""
    rng = np.random.default_rng(seed)
    seeds = _seed_draws(rng, matrices[0].shape[0], n_boot)
    subjects = _subject_draws(rng, labels, n_boot)
    points = np.array([metric(labels, scores).mean() for scores in matrices])
    return points, np.stack([_replicates(labels, scores, metric, seeds, subjects) for scores in matrices])


def _seed_draws(rng: np.random.Generator, n_seeds: int, n_boot: int) -> np.ndarray:
    return rng.integers(n_seeds, size=(n_boot, n_seeds))


def _subject_draws(rng: np.random.Generator, labels: np.ndarray, n_boot: int) -> np.ndarray:
    """(n_boot, n_subjects) indices drawn with replacement within each class, diseased first."""
    classes = [np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)]
    return np.concatenate([members[rng.integers(members.size, size=(n_boot, members.size))] for members in classes], 1)


def _replicates(
    labels: np.ndarray, scores: np.ndarray, metric: Metric, seeds: np.ndarray, subjects: np.ndarray
) -> np.ndarray:
    """Per replicate, the mean over its seeds of the metric on its subjects (the same subjects for every seed)."""
    resampled = scores[seeds[:, :, None], subjects[:, None, :]]
    return metric(labels[subjects][:, None, :], resampled).mean(axis=1)


def _gap_ratio(values: np.ndarray) -> np.ndarray:
    """(personalised - global) / (reference - global) along the first axis; NaN where |denominator| < MIN_GAP."""
    personalised, global_, reference = values
    gap = reference - global_
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(gap) >= MIN_GAP, (personalised - global_) / gap, np.nan)


def _bootstrap_p(replicates: np.ndarray) -> float:
    tail = min(int(np.sum(replicates <= 0)), int(np.sum(replicates >= 0)))
    return min(1.0, 2 * (tail + 1) / (replicates.size + 1))


def _effect(estimate: float, replicates: np.ndarray, sizes: tuple[int, int], p_value: float) -> Effect:
    low, high = np.quantile(replicates, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return Effect(float(estimate), float(low), float(high), p_value, *sizes, replicates.size)


# ---- what a test set can show: Hanley & McNeil (1982) standard error and the paired difference it can detect ----


def hanley_mcneil_se(area: ArrayLike, n_pos: ArrayLike, n_neg: ArrayLike) -> np.ndarray:
    """Standard error of an AUROC `area` from n_pos diseased and n_neg healthy subjects (Hanley & McNeil 1982)."""
    area = np.asarray(area, dtype=np.float64)
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    variance = area * (1 - area) + (np.asarray(n_pos) - 1) * (q1 - area**2) + (np.asarray(n_neg) - 1) * (q2 - area**2)
    return np.sqrt(variance / (np.asarray(n_pos) * np.asarray(n_neg)))


def min_detectable_paired_delta(
    area: ArrayLike, n_pos: ArrayLike, n_neg: ArrayLike, rho: float, alpha: float = 0.05, power: float = 0.8
) -> np.ndarray:
    """Smallest paired AUROC difference a two-sided z-test at `alpha` detects with `power`: two methods of AUROC
    `area` on the same subjects, their AUROCs correlated `rho`, SE of the difference sqrt(2 (1 - rho)) * SE."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return z * np.sqrt(2 * (1 - rho)) * hanley_mcneil_se(area, n_pos, n_neg)
