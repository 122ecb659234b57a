"""Benchmark metrics and aggregates checked against values computed by hand."""

import math

import pytest

from app.evaluation import (
    Confusion,
    auroc,
    binary_metrics,
    mean_over_sites,
    mean_std,
    metrics_from_confusion,
    pooled_metrics,
    weighted_mean_over_sites,
)


def test_confusion_counts_each_cell():
    confusion = Confusion.from_predictions([0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1])
    assert confusion == Confusion(tn=2, fp=1, fn=1, tp=3)


def test_metrics_from_confusion_by_hand():
    # tn=2 fp=1 fn=1 tp=3: sens 3/4, spec 2/3, MCC (6-1)/sqrt(4*4*3*3) = 5/12, F1 6/8.
    metrics = metrics_from_confusion(Confusion(tn=2, fp=1, fn=1, tp=3))
    assert metrics["sensitivity"] == pytest.approx(0.75)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["bal_acc"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert metrics["mcc"] == pytest.approx(5 / 12)
    assert metrics["f1"] == pytest.approx(0.75)


def test_undefined_metrics_are_nan_and_mcc_is_zero():
    # A split without healthy subjects: specificity and balanced accuracy are undefined, not 0 or 1.
    metrics = metrics_from_confusion(Confusion(tn=0, fp=0, fn=1, tp=3))
    assert math.isnan(metrics["specificity"])
    assert math.isnan(metrics["bal_acc"])
    assert metrics["sensitivity"] == pytest.approx(0.75)
    assert metrics["mcc"] == 0.0


def test_auroc_counts_ties_as_half():
    # Positives {0.9, 0.4}, negatives {0.4, 0.1}: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4 -> 1/2) (0.4>0.1) = 3.5 / 4.
    assert auroc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))


def test_binary_metrics_thresholds_like_argmax():
    # Score exactly 0.5 is a logit tie, which argmax resolves to class 0 (healthy).
    metrics = binary_metrics([0, 1, 1, 0], [0.5, 0.51, 0.2, 0.1])
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (2, 0, 1, 1)
    assert metrics["n"] == 4
    assert metrics["bal_acc"] == pytest.approx(0.75)


def test_binary_metrics_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="labels must hold only 0 and 1"):
        binary_metrics([0, 2], [0.1, 0.9])


def test_site_means_and_pooled_differ_as_expected():
    site_a = ([1, 1, 1, 0], [0.9, 0.8, 0.7, 0.6])  # tp=3 fp=1: sens 1, spec 0, bal-acc 0.5
    site_b = ([1, 0], [0.2, 0.1])  # fn=1 tn=1: sens 0, spec 1, bal-acc 0.5
    per_site = {"a": binary_metrics(*site_a), "b": binary_metrics(*site_b)}
    assert mean_over_sites(per_site)["bal_acc"] == pytest.approx(0.5)
    assert mean_over_sites(per_site)["sensitivity"] == pytest.approx(0.5)
    # Pooled: tp=3 fn=1 tn=1 fp=1 -> sens 3/4, spec 1/2, bal-acc 5/8.
    pooled = pooled_metrics({"a": site_a, "b": site_b})
    assert pooled["bal_acc"] == pytest.approx(0.625)
    # Weighted by test size 4 and 2: sensitivity (4*1 + 2*0) / 6.
    assert weighted_mean_over_sites(per_site, {"a": 4, "b": 2})["sensitivity"] == pytest.approx(4 / 6)


def test_mean_over_sites_leaves_out_undefined_sites():
    per_site = {"a": {"bal_acc": 0.6} | dict.fromkeys(["sensitivity", "specificity", "auroc", "mcc", "f1"], 0.0)}
    per_site["b"] = dict(per_site["a"], bal_acc=math.nan)
    assert mean_over_sites(per_site)["bal_acc"] == pytest.approx(0.6)


def test_mean_std_over_seeds_uses_sample_std():
    mean, std, count = mean_std([0.6, 0.7, 0.8, math.nan])
    assert (mean, count) == (pytest.approx(0.7), 3)
    assert std == pytest.approx(0.1)
    assert math.isnan(mean_std([0.5])[1])
