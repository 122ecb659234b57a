"""Binary disease-detection metrics and their aggregates: per site, mean over sites, pooled, and over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("bal_acc", "sensitivity", "specificity", "auroc", "mcc", "f1")
DECISION_THRESHOLD = 0.5


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


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def metrics_from_confusion(confusion: Confusion) -> dict[str, float]:
    """Every threshold metric of one confusion matrix.

    A metric whose denominator is empty is NaN (e.g. specificity on a split without healthy subjects), except
    MCC, which is 0 when a whole row or column of the matrix is empty (the usual convention: no correlation can be
    shown).
    """
    tn, fp, fn, tp = confusion.tn, confusion.fp, confusion.fn, confusion.tp
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    marginals = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return {
        "bal_acc": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "mcc": (tp * tn - fp * fn) / math.sqrt(marginals) if marginals > 0 else 0.0,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve as the Mann-Whitney probability P(score_pos > score_neg), ties counting one half.

    NaN when the labels hold only one class.
    """
    truth = _as_binary(labels, "labels")
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != truth.shape:
        raise ValueError(f"labels ({truth.size}) and scores ({values.size}) differ in length")
    positives, negatives = values[truth == 1], values[truth == 0]
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    greater = (positives[:, None] > negatives[None, :]).sum()
    equal = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * equal) / (positives.size * negatives.size))


def binary_metrics(
    labels: Sequence[int], scores: Sequence[float], predictions: Sequence[int] | None = None
) -> dict[str, float]:
    """All six metrics plus the confusion counts, from per-subject labels and P(diseased) scores.

    Predictions default to `score > 0.5`, which equals the argmax of two logits (a tie goes to class 0, healthy).
    """
    if predictions is None:
        predictions = (np.asarray(scores, dtype=np.float64) > DECISION_THRESHOLD).astype(np.int64)
    confusion = Confusion.from_predictions(labels, predictions)
    metrics = metrics_from_confusion(confusion)
    metrics["auroc"] = auroc(labels, scores)
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


def pooled_metrics(site_predictions: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> dict[str, float]:
    """Metrics over the test subjects of all sites together, as one test set."""
    labels = [label for site_labels, _ in site_predictions.values() for label in site_labels]
    scores = [score for _, site_scores in site_predictions.values() for score in site_scores]
    return binary_metrics(labels, scores)


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
