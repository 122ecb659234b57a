"""The benchmark's per-subject scoring (through models.metrics) and its aggregates: per site, mean over sites,
pooled, and over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.metrics import DEFAULT_THRESHOLD, METRIC_NAMES, subject_metrics


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary confusion matrix; label 1 (diseased) is the positive class."""

    tn: int
    fp: int
    fn: int
    tp: int

    @classmethod
    def from_predictions(cls, labels: Sequence[int], predictions: Sequence[int]) -> Confusion:
        truth = _as_binary(labels, "labels")
        predicted = _as_binary(predictions, "predictions")
        if truth.shape != predicted.shape:
            raise ValueError(f"labels ({truth.size}) and predictions ({predicted.size}) differ in length")
        return cls(
            tn=int(np.sum((truth == 0) & (predicted == 0))),
            fp=int(np.sum((truth == 0) & (predicted == 1))),
            fn=int(np.sum((truth == 1) & (predicted == 0))),
            tp=int(np.sum((truth == 1) & (predicted == 1))),
        )

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tn + other.tn, self.fp + other.fp, self.fn + other.fn, self.tp + other.tp)

    @property
    def n(self) -> int:
        return self.tn + self.fp + self.fn + self.tp


def _as_binary(values: Sequence[int], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1, got {sorted(set(array.tolist()))}")
    return array.astype(np.int64)


def binary_metrics(
    labels: Sequence[int], scores: Sequence[float], thresholds: float | Sequence[float] = DEFAULT_THRESHOLD
) -> dict[str, float]:
    """All six metrics (models.metrics.subject_metrics, the code that scores every model) plus the confusion
    counts, from per-subject labels and P(diseased) scores; each subject is called diseased when its score exceeds
    its threshold (one for all, or one per subject: pooled rows mix sites' models and thresholds)."""
    truth = _as_binary(labels, "labels")
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != truth.shape:
        raise ValueError(f"labels ({truth.size}) and scores ({values.size}) differ in length")
    called = (values > np.broadcast_to(np.asarray(thresholds, dtype=np.float64), values.shape)).astype(np.int64)
    confusion = Confusion.from_predictions(truth, called)
    metrics = subject_metrics(values, truth, thresholds)
    counts = {"n": confusion.n, "tn": confusion.tn, "fp": confusion.fp, "fn": confusion.fn, "tp": confusion.tp}
    return {name: metrics[name] for name in METRIC_NAMES} | counts


def mean_over_sites(site_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over sites; a site where the metric is undefined (NaN) is left out of it."""
    return {name: _nanmean([metrics[name] for metrics in site_metrics.values()]) for name in METRIC_NAMES}


def weighted_mean_over_sites(
    site_metrics: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]
) -> dict[str, float]:
    """Mean of each metric over sites weighted by `weights` (the test-subject counts); NaN sites are left out."""
    result = {}
    for name in METRIC_NAMES:
        pairs = [
            (metrics[name], weights[site]) for site, metrics in site_metrics.items() if math.isfinite(metrics[name])
        ]
        total = sum(weight for _, weight in pairs)
        result[name] = sum(value * weight for value, weight in pairs) / total if total > 0 else math.nan
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; NaN for fewer than two values) and count of the finite values."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std, len(finite)


def _nanmean(values: Sequence[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else math.nan
