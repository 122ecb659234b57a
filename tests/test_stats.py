"""Bootstrap effects, metrics and Hanley-McNeil figures checked by hand, against torchmetrics and by simulation."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from scipy.special import expit
from torchmetrics.functional import classification as tmf

from experiments.stats import (
    Effect,
    auroc,
    balanced_accuracy,
    brier,
    expected_calibration_error,
    gap_closure,
    hanley_mcneil_se,
    holm_effects,
    metric_interval,
    min_detectable_paired_delta,
    paired_delta,
    sensitivity,
    sensitivity_at_specificity,
    specificity,
    worst_site_interval,
)
from models.metrics import detection_metrics

METRICS = [auroc, balanced_accuracy, sensitivity_at_specificity, brier, expected_calibration_error]


def _simulated(rng, n_seeds=3, n_pos=100, n_neg=50, noise_a=1.0, noise_b=1.0, seed_spread=0.3):
    """Labels and two methods' (n_seeds, n) scores of the same hearts; each seed's run learns the signal to its own
    degree (seed_spread), each method adds its own per-subject noise."""
    labels = np.repeat([1, 0], [n_pos, n_neg])
    heart = 1.5 * labels + rng.normal(size=labels.size)

    def method(noise):
        quality = 1 + seed_spread * rng.normal(size=(n_seeds, 1))
        return expit(quality * heart + noise * rng.normal(size=(n_seeds, labels.size)))

    return labels, method(noise_a), method(noise_b)


def _prevalence(labels, scores):
    return np.broadcast_to(labels, scores.shape).mean(axis=-1)


def _mean_score(labels, scores):
    return np.mean(scores, axis=-1)


# ---- metrics ----


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_auroc_equals_torchmetrics_over_leading_axes(decimals):
    rng = np.random.default_rng(0)
    labels = (rng.random(60) < 0.6).astype(np.int64)
    scores = rng.random((3, 4, 60))
    scores = scores if decimals is None else np.round(scores, decimals)  # rounding makes cross-class ties
    rows = scores.reshape(12, 60)
    expected = [tmf.binary_auroc(torch.from_numpy(row), torch.from_numpy(labels)).item() for row in rows]
    assert auroc(labels, scores) == pytest.approx(np.reshape(expected, (3, 4)), abs=1e-6)


def test_auroc_counts_a_tied_pair_one_half_and_needs_both_classes():
    # pairs (d, h): 0.8>0.2, 0.8>0.5, 0.5=0.5 (one half), 0.5>0.2 -> 3.5 / 4
    assert auroc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)
    assert np.isnan(auroc([1, 1, 1], [0.2, 0.5, 0.9]))


@pytest.mark.parametrize("threshold", [0.5, 0.25])
def test_threshold_metrics_equal_models_metrics(threshold):
    # scores on a grid of 1/20 include the threshold itself, which must not be called diseased (p > threshold)
    rng = np.random.default_rng(1)
    labels = (rng.random(80) < 0.6).astype(np.int64)
    scores = rng.integers(0, 21, size=(5, 80)) / 20
    assert (scores == threshold).any()
    expected = [detection_metrics(torch.from_numpy(row), torch.from_numpy(labels), threshold) for row in scores]
    for metric, name in [(sensitivity, "sensitivity"), (specificity, "specificity"), (balanced_accuracy, "bal_acc")]:
        got = metric(labels, scores, threshold)
        assert got == pytest.approx([row[name] for row in expected], abs=1e-6), name  # torchmetrics: float32


@pytest.mark.parametrize(
    ("min_specificity", "expected"),
    [
        (0.8, 4 / 6),  # 8 of 10 healthy at or below t = 0.4; the diseased 0.4 is not above it
        (0.9, 2 / 6),  # 9 healthy at or below t = 0.6
        (1.0, 1 / 6),  # t = the highest healthy score 0.7
    ],
)
def test_sensitivity_at_specificity_by_hand(min_specificity, expected):
    healthy = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 0.7]
    diseased = [0.3, 0.4, 0.45, 0.5, 0.65, 0.9]
    labels = [0] * len(healthy) + [1] * len(diseased)
    assert sensitivity_at_specificity(labels, healthy + diseased, min_specificity) == pytest.approx(expected)


def test_sensitivity_at_specificity_survives_float_products():
    # 0.07 * 100 is 7.000000000000001: still 7 healthy at or below t = 0.06, so the diseased 0.065 is above it
    labels = [0] * 100 + [1, 1]
    scores = [*np.arange(100) / 100, 0.065, 0.5]
    assert sensitivity_at_specificity(labels, scores, 0.07) == pytest.approx(1.0)


def test_brier_by_hand():
    # (0.1^2 + 0.2^2 + 0.4^2 + 0.5^2) / 4
    assert brier([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.5]) == pytest.approx(0.115)


def test_expected_calibration_error_by_hand():
    # bins [0, .1): |0 - .05|; [.1, .2): |1 - .27|; [.8, .9): |1 - 1.66|; [.9, 1]: |1 - .95| -> summed, over 6 subjects
    labels = [0, 1, 0, 1, 1, 0]
    scores = [0.05, 0.15, 0.12, 0.95, 0.85, 0.81]
    assert expected_calibration_error(labels, scores) == pytest.approx((0.05 + 0.73 + 0.66 + 0.05) / 6)


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_calibration_error_equals_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(200) < 0.6).astype(np.int64)
    scores = rng.random((3, 200))
    expected = [
        tmf.binary_calibration_error(torch.from_numpy(row), torch.from_numpy(labels), n_bins=10, norm="l1").item()
        for row in scores
    ]
    assert expected_calibration_error(labels, scores) == pytest.approx(expected, abs=1e-9)


# ---- the hierarchical bootstrap ----


@pytest.mark.parametrize("metric", METRICS, ids=lambda metric: metric.__name__)
def test_identical_methods_give_zero_with_p_one(metric):
    labels, scores, _ = _simulated(np.random.default_rng(2))
    effect = paired_delta(labels, scores, scores.copy(), metric=metric, n_boot=300)
    assert (effect.estimate, effect.low, effect.high, effect.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (effect.n_seeds, effect.n_subjects, effect.n_boot) == (3, 150, 300)


def test_large_effect_excludes_zero_with_the_smallest_p():
    rng = np.random.default_rng(3)
    labels, better, worse = _simulated(rng, n_seeds=5, n_pos=200, n_neg=100, noise_a=0.5, noise_b=2.5, seed_spread=0.1)
    effect = paired_delta(labels, better, worse, n_boot=500)
    assert effect.estimate == pytest.approx(np.mean(auroc(labels, better) - auroc(labels, worse)))
    assert effect.low > 0.05
    assert effect.p_value == pytest.approx(2 / 501)  # no replicate <= 0: (0 + 1) / (500 + 1), twice


def test_no_effect_interval_covers_zero():
    # 50 datasets (seeds 0..49, none left out) where a and b are exchangeable: the 95 % interval must cover the
    # true difference 0 in at least 85 % of them, and p >= 0.05 as often. Seed-to-seed quality spread makes
    # this fail when seeds are not resampled (coverage ~0.76 then).
    covered, not_small = [], []
    for dataset in range(50):
        labels, scores_a, scores_b = _simulated(np.random.default_rng(dataset))
        effect = paired_delta(labels, scores_a, scores_b, n_boot=500, seed=dataset)
        covered.append(effect.low <= 0 <= effect.high)
        not_small.append(effect.p_value >= 0.05)
    assert np.mean(covered) >= 0.85
    assert np.mean(not_small) >= 0.85


def test_subjects_are_resampled_within_each_class():
    labels, scores, _ = _simulated(np.random.default_rng(4))
    effect = metric_interval(labels, scores, metric=_prevalence, n_boot=300)
    assert effect.low == effect.high == pytest.approx(100 / 150)


def test_seeds_are_resampled():
    # seed 0 ranks perfectly (AUROC 1 on every subject resample), seed 1 inversely (0): replicates are 0, 0.5 or 1
    labels = [1, 1, 0, 0]
    scores = [[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8]]
    effect = metric_interval(labels, scores, n_boot=1000)
    assert (effect.estimate, effect.low, effect.high) == (0.5, 0.0, 1.0)


def test_every_resampled_seed_shares_the_subjects():
    # five identical seeds must vary like one seed; independent subjects per seed would shrink the width ~sqrt(5)
    labels, scores, _ = _simulated(np.random.default_rng(5), n_seeds=1)
    one = metric_interval(labels, scores, n_boot=1000)
    five = metric_interval(labels, np.repeat(scores, 5, axis=0), n_boot=1000)
    assert (five.high - five.low) / (one.high - one.low) == pytest.approx(1, abs=0.2)


def test_metric_interval_brackets_its_estimate_and_tests_nothing():
    labels, scores, _ = _simulated(np.random.default_rng(6))
    effect = metric_interval(labels, scores, n_boot=300)
    assert effect.estimate == pytest.approx(np.mean(auroc(labels, scores)))
    assert effect.low < effect.estimate < effect.high
    assert math.isnan(effect.p_value)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 1, 1], [[0.1, 0.2, 0.3]], "both healthy"),
        ([0, 1, 2], [[0.1, 0.2, 0.3]], "vector of 0 and 1"),
        ([0, 1, 1], [0.1, 0.2, 0.3], r"\(n_seeds, 3\)"),
        ([0, 1, 1], [[0.1, 0.2]], r"\(n_seeds, 3\)"),
        ([0, 1, 1], [[0.1, np.nan, 0.3]], "finite"),
    ],
)
def test_bad_input_is_refused(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        metric_interval(labels, scores)


def test_holm_effects_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04); the untested one stays NaN
    effects = [Effect(0.1, 0.0, 0.2, p, 3, 300, 2000) for p in (0.01, 0.04, math.nan, 0.03)]
    adjusted = [effect.p_holm for effect in holm_effects(effects)]
    assert adjusted == pytest.approx([0.03, 0.06, math.nan, 0.06], nan_ok=True)


# ---- worst site and gap closure ----


def test_worst_site_takes_the_minimum_over_sites():
    # site 1 is far worse than the others: the worst-site interval is that site's own, not a blend of the sites
    sites = [
        _simulated(np.random.default_rng(7 + site), noise_a=noise)[:2] for site, noise in enumerate([0.3, 3, 0.3])
    ]
    effect = worst_site_interval(sites, n_boot=1000)
    worst = metric_interval(*sites[1], n_boot=1000)
    assert effect.estimate == pytest.approx(min(np.mean(auroc(labels, scores)) for labels, scores in sites))
    assert (effect.estimate, effect.low, effect.high) == pytest.approx(
        (worst.estimate, worst.low, worst.high), abs=0.02
    )
    assert (effect.n_seeds, effect.n_subjects) == (3, 450)


def test_worst_site_resamples_the_seeds_jointly():
    # three copies of the perfect / inverted seeds of test_seeds_are_resampled: drawn jointly, the sites take the same
    # seed mean (0, 0.5 or 1: 1 a quarter of the time) and so does their minimum; drawn per site, the minimum would be
    # 1 in (1/4)^3 < 2.5 % of replicates only
    labels = [1, 1, 0, 0]
    scores = [[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8]]
    effect = worst_site_interval([(labels, scores)] * 3, n_boot=1000)
    assert (effect.estimate, effect.low, effect.high) == (0.5, 0.0, 1.0)


def test_worst_site_needs_the_same_seeds_everywhere():
    labels, scores, _ = _simulated(np.random.default_rng(8))
    with pytest.raises(ValueError, match="same seeds"):
        worst_site_interval([(labels, scores), (labels, scores[:2])])


@pytest.mark.parametrize(("personalised_share", "expected"), [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_gap_closure_of_a_known_ratio(personalised_share, expected):
    # the mean score is linear: personalised = global + share * (reference - global) closes `share` of the gap in
    # every replicate, when the three matrices are resampled together
    labels, global_, _ = _simulated(np.random.default_rng(9))
    reference = global_ + 0.2
    personalised = global_ + personalised_share * 0.2
    effect = gap_closure(labels, personalised, global_, reference, metric=_mean_score, n_boot=300)
    assert (effect.estimate, effect.low, effect.high) == pytest.approx((expected,) * 3, abs=1e-9)


@pytest.mark.parametrize(("personalised", "expected"), [("global", 0.0), ("reference", 1.0)])
def test_gap_closure_of_auroc_at_its_ends(personalised, expected):
    labels, reference, global_ = _simulated(np.random.default_rng(10), noise_a=0.3, noise_b=3, seed_spread=0.0)
    scores = {"global": global_, "reference": reference}[personalised]
    effect = gap_closure(labels, scores, global_, reference, n_boot=300)
    assert (effect.estimate, effect.low, effect.high) == (expected,) * 3
    assert effect.n_boot == 300


@pytest.mark.parametrize(("gap", "defined"), [(0.03, True), (0.02, False)])
def test_gap_closure_leaves_out_replicates_without_a_gap(gap, defined):
    # reference - global is a mean of per-subject gaps (mean `gap`, SD 0.1) over 150 subjects (SE 0.008): below
    # MIN_GAP = 0.01 in ~1 % of replicates at 0.03 (left out), in ~11 % at 0.02 (more than 5 %: no interval)
    rng = np.random.default_rng(13)
    labels, global_, _ = _simulated(rng)
    noise = rng.normal(size=global_.shape[1])
    reference = global_ + gap + 0.1 * (noise - noise.mean()) / noise.std()
    effect = gap_closure(labels, (global_ + reference) / 2, global_, reference, metric=_mean_score)
    assert effect.estimate == pytest.approx(0.5)
    assert 0 < 2000 - effect.n_boot <= 100 if defined else effect.n_boot < 1900
    assert math.isfinite(effect.low) == math.isfinite(effect.high) == defined


def test_gap_closure_is_a_ratio_of_seed_means():
    # seed 0 closes 0.1 of a 0.2 gap, seed 1 0.1 of 0.4: (0.1 + 0.1) / (0.2 + 0.4) = 1/3, not the mean ratio 0.375
    labels, global_, _ = _simulated(np.random.default_rng(14), n_seeds=2)
    reference = global_ + [[0.2], [0.4]]
    effect = gap_closure(labels, global_ + 0.1, global_, reference, metric=_mean_score, n_boot=300)
    assert effect.estimate == pytest.approx(1 / 3)


def test_gap_closure_without_a_gap_is_undefined():
    labels, global_, personalised = _simulated(np.random.default_rng(11))
    effect = gap_closure(labels, personalised, global_, global_.copy(), n_boot=300)
    assert all(math.isnan(value) for value in (effect.estimate, effect.low, effect.high))
    assert effect.n_boot == 0


# ---- Hanley & McNeil ----


def test_hanley_mcneil_by_hand():
    # A = 0.8, 50 + 50: Q1 = 0.8 / 1.2, Q2 = 1.28 / 1.8;
    # (0.16 + 49 (Q1 - 0.64) + 49 (Q2 - 0.64)) / 2500 = 4.9511111 / 2500
    assert hanley_mcneil_se(0.8, 50, 50) == pytest.approx(math.sqrt(4.9511111 / 2500), rel=1e-6)


@pytest.mark.parametrize(("area", "n_pos", "n_neg"), [(0.85, 6, 2), (0.85, 200, 100), (0.893, 51, 58)])
def test_hanley_mcneil_is_the_spread_of_auroc_under_exponential_scores(area, n_pos, n_neg):
    # Q1 = A / (2 - A) and Q2 = 2 A^2 / (1 + A) are exact when healthy ~ Exp(1) and diseased ~ Exp(rate (1 - A) / A):
    # the formula is then the exact variance of the Mann-Whitney AUROC; 10000 simulated test sets must agree
    # (0.893 from 51 diseased and 58 healthy: Hanley & McNeil's CT example, Table I)
    rng = np.random.default_rng(12)
    labels = np.repeat([1, 0], [n_pos, n_neg])
    scale = np.where(labels == 1, area / (1 - area), 1.0)
    areas = auroc(labels, rng.exponential(scale, size=(10000, labels.size)))
    assert np.mean(areas) == pytest.approx(area, abs=0.006)
    assert np.std(areas) == pytest.approx(hanley_mcneil_se(area, n_pos, n_neg), rel=0.03)


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "se", "delta"),
    [(6, 2, 0.15, 0.27), (200, 100, 0.02, 0.04)],  # the issue's figures at AUROC 0.85, n = 8 and n = 300
)
def test_issue_figures_hold(n_pos, n_neg, se, delta):
    assert hanley_mcneil_se(0.85, n_pos, n_neg) == pytest.approx(se, abs=0.005)
    assert min_detectable_paired_delta(0.85, n_pos, n_neg, rho=0.8) == pytest.approx(delta, abs=0.005)


def test_bootstrap_width_agrees_with_hanley_mcneil():
    # exponential scores of AUROC 0.85 (where Hanley-McNeil is exact), 200 + 100 subjects, one seed: the 95 %
    # interval's width / 3.92, averaged over 20 test sets, is the SE (a 90 % interval would be 16 % short)
    labels = np.repeat([1, 0], [200, 100])
    widths = []
    for dataset in range(20):
        scores = np.random.default_rng(dataset).exponential(np.where(labels == 1, 0.85 / 0.15, 1.0))
        effect = metric_interval(labels, scores[None], n_boot=1000, seed=dataset)
        widths.append((effect.high - effect.low) / (2 * scipy_stats.norm.ppf(0.975)))
    assert np.mean(widths) == pytest.approx(hanley_mcneil_se(0.85, 200, 100), rel=0.08)
