"""Benchmark metrics and aggregates checked against values computed by hand."""

import math

import pytest
import torch

from models.metrics import (
    Confusion,
    binary_metrics,
    detection_metrics,
    mean_over_sites,
    mean_std,
    weighted_mean_over_sites,
)


def test_confusion_counts_each_cell():
    confusion = Confusion.from_predictions([0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1])
    assert confusion == Confusion(tn=2, fp=1, fn=1, tp=3)


def test_metrics_by_hand():
    # labels 0 0 0 1 1 1 1, called 0 1 0 1 1 0 1: tn=2 fp=1 fn=1 tp=3.
    # sens 3/4, spec 2/3, MCC (6-1)/sqrt(4*4*3*3) = 5/12, F1 6/8; AUROC: 10 of the 12 (pos, neg) pairs ordered right.
    metrics = binary_metrics([0, 0, 0, 1, 1, 1, 1], [0.1, 0.7, 0.2, 0.9, 0.8, 0.3, 0.6])
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (2, 1, 1, 3)
    assert metrics["sensitivity"] == pytest.approx(0.75)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["bal_acc"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert metrics["mcc"] == pytest.approx(5 / 12)
    assert metrics["f1"] == pytest.approx(0.75)
    assert metrics["auroc"] == pytest.approx(10 / 12)


def test_auroc_counts_ties_as_half():
    # Positives {0.9, 0.4}, negatives {0.4, 0.1}: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4 -> 1/2) (0.4>0.1) = 3.5 / 4.
    assert binary_metrics([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1])["auroc"] == pytest.approx(0.875)


DEGENERATE = [
    # labels, scores, and what the one convention (models.metrics.detection_metrics) gives; None = NaN (undefined)
    pytest.param(
        [1, 1, 1],
        [0.9, 0.8, 0.7],
        {"sensitivity": 1.0, "specificity": None, "mcc": None, "f1": 1.0},
        id="all-sick-right",
    ),
    pytest.param(
        [1, 1, 1, 1],
        [0.9, 0.9, 0.9, 0.1],
        {"sensitivity": 0.75, "specificity": None, "mcc": None, "f1": 6 / 7},
        id="all-sick-one-missed",
    ),
    pytest.param(
        [0, 0], [0.1, 0.2], {"sensitivity": None, "specificity": 1.0, "mcc": None, "f1": None}, id="all-healthy-right"
    ),
    pytest.param(
        [0, 1, 0, 1],
        [0.1, 0.2, 0.3, 0.4],
        {"sensitivity": 0.0, "specificity": 1.0, "mcc": 0.0, "f1": 0.0},
        id="nobody-called-sick",
    ),
]


@pytest.mark.parametrize(("labels", "scores", "expected"), DEGENERATE)
def test_degenerate_splits_follow_one_convention_in_every_scorer(labels, scores, expected):
    """The benchmark's per-subject scoring and the LightningModule's scoring are one code: they agree here too.

    They used to disagree: MCC 1 against 0 on an all-diseased, all-right split; F1 0 against NaN when all healthy.
    """
    from_rows = binary_metrics(labels, scores)
    from_module = detection_metrics(torch.tensor(scores), torch.tensor(labels))
    for name, value in expected.items():
        for metrics in (from_rows, from_module):
            if value is None:
                assert math.isnan(metrics[name]), (name, metrics)
            else:
                assert metrics[name] == pytest.approx(value), (name, metrics)
    assert math.isnan(from_rows["auroc"]) == math.isnan(from_rows["bal_acc"]) == (len(set(labels)) < 2)


def test_each_subject_is_called_at_its_own_model_threshold():
    # A score exactly at the threshold is not called diseased (score > threshold).
    metrics = binary_metrics([0, 1, 1, 0], [0.5, 0.51, 0.2, 0.1])
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (2, 0, 1, 1)
    assert metrics["n"] == 4 and metrics["bal_acc"] == pytest.approx(0.75)
    # A pooled row of two sites with thresholds 0.5 and 0.15: the second site's 0.2 is now called diseased.
    pooled = binary_metrics([0, 1, 1, 0], [0.5, 0.51, 0.2, 0.1], thresholds=[0.5, 0.5, 0.15, 0.15])
    assert (pooled["fn"], pooled["tp"]) == (0, 2)


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
    pooled = binary_metrics(site_a[0] + site_b[0], site_a[1] + site_b[1])
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
