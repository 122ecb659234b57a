"""Disease-detection metrics at a decision threshold, the validation threshold rule, and bootstrap AUROC intervals.

One implementation scores every model: a site's personalised and global-only models, the centralized baseline, the
demo's pooled rows and the benchmark's rows, with their aggregates over sites and seeds. The threshold rule works on
score histograms, so that a pooled threshold can be chosen from histograms summed over sites (no subject's score
leaves a site), and a single site or the centralized baseline uses the very same rule on its own histogram.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional import classification as tmf

from models.protocol import METRIC_NAMES

DEFAULT_THRESHOLD = 0.5
"""The threshold when validation cannot choose one (a class is missing): the prior-neutral point of a model trained
with a class-balanced loss."""
HISTOGRAM_BINS = 100
"""Score resolution of the threshold rule: thresholds are multiples of 0.01. Coarse on purpose: a site's histogram
is what it sends for the pooled threshold, and a coarser one says less about each subject's score."""


def detection_metrics(
    p_diseased: torch.Tensor | Sequence[float],
    labels: torch.Tensor | Sequence[int],
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """Disease-detection metrics (1 = diseased is positive, called when p > threshold) with torchmetrics.

    Degenerate splits follow one convention, checked on hand-computed cases (tests/test_evaluation.py): a metric
    whose definition needs a class the labels lack is NaN (sensitivity, F1 without a diseased subject; specificity
    without a healthy one; balanced accuracy, AUROC and MCC without both); MCC is 0 when the labels hold both classes
    but every prediction is the same (nothing is shown), and F1 is 0 when no diseased subject is called.
    """
    p_diseased, labels = torch.as_tensor(p_diseased).float(), torch.as_tensor(labels).long()
    has_pos, has_neg = bool((labels == 1).any()), bool((labels == 0).any())
    both = has_pos and has_neg
    sens = tmf.binary_recall(p_diseased, labels, threshold).item() if has_pos else math.nan
    spec = tmf.binary_specificity(p_diseased, labels, threshold).item() if has_neg else math.nan
    return {
        "bal_acc": (sens + spec) / 2,
        "sensitivity": sens,
        "specificity": spec,
        "auroc": tmf.binary_auroc(p_diseased, labels).item() if both else math.nan,
        "mcc": float(tmf.binary_matthews_corrcoef(p_diseased, labels, threshold).item()) if both else math.nan,
        "f1": tmf.binary_f1_score(p_diseased, labels, threshold).item() if has_pos else math.nan,
    }


def subject_metrics(
    p_diseased: Sequence[float], labels: Sequence[int], thresholds: float | Sequence[float]
) -> dict[str, float]:
    """`detection_metrics` when each subject is decided at its own threshold (a pooled row of several sites'
    models): threshold metrics from the decisions, AUROC from the scores themselves."""
    scores = np.asarray(p_diseased, dtype=np.float64)
    truth = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    called = scores > np.broadcast_to(np.asarray(thresholds, dtype=np.float64), scores.shape)
    metrics = detection_metrics(torch.from_numpy(called.astype(np.float32)), truth, 0.5)
    return metrics | {"auroc": detection_metrics(torch.from_numpy(scores), truth)["auroc"]}


def score_histogram(p_diseased: Sequence[float] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> np.ndarray:
    """Counts of scores per bin of [0, 1], one row per label: (2, HISTOGRAM_BINS) int64, row 0 healthy."""
    scores = np.clip(np.asarray(torch.as_tensor(p_diseased).float(), dtype=np.float64), 0.0, 1.0)
    classes = np.asarray(torch.as_tensor(labels).long())
    bins = np.minimum((scores * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
    histogram = np.zeros((2, HISTOGRAM_BINS), dtype=np.int64)
    np.add.at(histogram, (classes, bins), 1)
    return histogram


def threshold_from_histogram(histogram: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy on a (summed) score histogram.

    Candidates are the bin edges j / HISTOGRAM_BINS, calling bins >= j diseased. Among equally good edges the median
    one is taken (the middle of the plateau between the classes). Without both classes: DEFAULT_THRESHOLD.
    """
    histogram = np.asarray(histogram, dtype=np.int64)
    healthy, diseased = histogram[0].sum(), histogram[1].sum()
    if healthy == 0 or diseased == 0:
        return DEFAULT_THRESHOLD
    # called diseased at edge j: bins j..end; append the empty tail so that edge = 1 (nobody diseased) is a candidate
    diseased_called = np.append(np.cumsum(histogram[1][::-1])[::-1], 0)
    healthy_called = np.append(np.cumsum(histogram[0][::-1])[::-1], 0)
    balanced = 0.5 * (diseased_called / diseased + 1.0 - healthy_called / healthy)
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(best[len(best) // 2]) / HISTOGRAM_BINS


def choose_threshold(p_diseased: Sequence[float] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """The validation threshold of one model on its own validation scores (`threshold_from_histogram`)."""
    return threshold_from_histogram(score_histogram(p_diseased, labels))


def bootstrap_auroc(
    p_diseased: Sequence[float], labels: Sequence[int], n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC and its 95 % percentile-bootstrap interval (resampling subjects within each class, so that every
    resample has both classes); NaNs without both classes."""
    scores = torch.as_tensor(np.asarray(p_diseased, dtype=np.float32))
    classes = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    positives, negatives = torch.nonzero(classes == 1).flatten(), torch.nonzero(classes == 0).flatten()
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan, math.nan, math.nan
    point = tmf.binary_auroc(scores, classes).item()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.cat(
        [
            positives[torch.randint(len(positives), (n_resamples, len(positives)), generator=generator)],
            negatives[torch.randint(len(negatives), (n_resamples, len(negatives)), generator=generator)],
        ],
        dim=1,
    )
    values = torch.tensor([tmf.binary_auroc(scores[draw], classes[draw]).item() for draw in draws])
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975])).tolist()
    return point, low, high


# ---- per-subject rows with confusion counts, and aggregates over sites and seeds (the benchmark, centralized) ----


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
