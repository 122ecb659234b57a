"""The benchmark report from synthetic records whose effects are known: files, rows, control verdicts, pairing."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import asdict

import numpy as np
import pytest
from scipy.special import expit

from experiments import analysis as benchmark_analysis
from experiments.analysis import (
    PLOT_FILES,
    RESULT_COLUMNS,
    Benchmark,
    Scored,
    negative_verdict,
    over_sites,
    paired_deltas,
    positive_verdict,
)
from experiments.design import HEADLINE, NEGATIVE_CONTROL, POSITIVE_CONTROL, SHIFTED_SITE, Condition
from experiments.records import RECORD_SCHEMA, record_path, rounded, write_record
from experiments.report import write_report
from experiments.runs import METHODS
from experiments.stats import Effect, auroc, balanced_accuracy, paired_delta, worst_site_interval
from models.protocol import SITES

KINDS = {
    "med_duallora": ("personalised", "global"),
    "fedit": ("global",),
    "local_only": ("personalised",),
    "centralized": ("central",),
}
VARIANT_KINDS = {
    name: KINDS["med_duallora"] for name in ("med_duallora_fp16", "med_duallora_int8", "med_duallora_dp8")
}
CONTROL_METHODS = ("med_duallora", "fedit", "local_only")
FAST = {"n_boot": 300, "row_n_boot": 50}
"""Replicates for the tests: the report's figures, not the intervals' precision, are under test."""


def labels_of(site: str, n_test: int) -> np.ndarray:
    """A site's fixed test labels (one healthy in three), the same in every run of a condition."""
    return (np.arange(n_test) % 3 != 0).astype(int) if site != "ge" else (np.arange(n_test) % 4 != 0).astype(int)


def make_record(
    condition: Condition,
    method: str,
    seed: int,
    strength: Mapping[tuple[str, str], float] | None = None,
    n_test: int = 60,
    shuffle: bool = False,
) -> dict:
    """A record whose P(diseased) is expit(s * (2y - 1) + z): z is the seed's per-subject noise, shared by every
    model of that seed (so paired differences are exact), s the model's separation at the site (1 unless
    `strength[(kind, site)]` says otherwise). With `shuffle`, each site lists its subjects in a seed-specific order."""
    sites, kinds = {}, (KINDS | VARIANT_KINDS)[method]
    for index, site in enumerate(SITES):
        labels = labels_of(site, n_test)
        noise = np.random.default_rng([seed, index]).normal(size=n_test)
        order = np.random.default_rng([seed, index, 7]).permutation(n_test) if shuffle else np.arange(n_test)
        models = {}
        for kind in kinds:
            separation = (strength or {}).get((kind, site), 1.0)
            scores = expit(separation * (2 * labels - 1) + noise)
            siemens = expit(separation * (2 * labels - 1) + noise + 0.5 * (2 * labels - 1))
            models[kind] = {
                "threshold": 0.5,
                "test": rounded(scores[order]),
                "test_siemens": rounded(siemens[order]),
                "val": rounded(scores[:20]),
            }
        sites[site] = {
            "test_ids": [f"{site}-{i:03d}" for i in order],
            "test_labels": labels[order].tolist(),
            "val_ids": [f"{site}-val-{i}" for i in range(20)],
            "val_labels": labels[:20].tolist(),
            "models": models,
        }
    sent = {"centralized": None, "local_only": 0.0, "med_duallora_int8": 5e4}.get(method, 1e5 * (1 + len(kinds)))
    return {
        "schema": RECORD_SCHEMA,
        "condition": {"name": condition.name, "role": condition.role, **asdict(condition)},
        "method": method,
        "seed": seed,
        "hyperparameters": {"rounds": 2, "local_epochs": 1, "lr": 0.001},
        "cohort": {"test_per_site": n_test},
        "sites": sites,
        "rounds": [
            {"round": r, "site": site, "auroc": 0.6 + 0.05 * r, "bal_acc": 0.6} for r in range(3) for site in SITES
        ],
        "cost": {
            "params": {"total": 1000, "trainable": 100, "shared": None if method == "centralized" else 50},
            "bytes_sent_per_client_round": sent,
            "job_wall_s": 12.0,
            "seeds_in_job": 2,
        },
        "not_evaluable": {},
        **(
            {"privacy": {"delta": 1e-5, "epsilon_per_site": {}, "epsilon": 7.9 + 0.05 * seed}}
            if "_dp" in method
            else {}
        ),
    }


def write_runs(results, condition, methods, seeds=(0, 1), strengths=None, **options) -> list[dict]:
    records = []
    for method in methods:
        for seed in seeds:
            record = make_record(condition, method, seed, (strengths or {}).get(method), **options)
            write_record(record_path(results, condition.name, method, seed), record)
            records.append(record)
    return records


def passing_controls(results) -> None:
    """Controls as designed: no effect without a shift; a large personalisation gain at the shifted site only."""
    write_runs(results, NEGATIVE_CONTROL, CONTROL_METHODS)
    gain = {("personalised", SHIFTED_SITE): 3.0}
    write_runs(results, POSITIVE_CONTROL, CONTROL_METHODS, strengths={"med_duallora": gain, "local_only": gain})


def summary(results) -> str:
    return (results / "summary.md").read_text(encoding="utf-8")


def quiet(message: str) -> None:
    """The report's log, dropped."""


# ---- the files ----


def test_every_file_is_written_with_one_row_per_model_and_intervals_around_each_estimate(tmp_path):
    records = write_runs(tmp_path, HEADLINE, KINDS)
    records += write_runs(tmp_path, Condition(0.0), ("med_duallora", "fedit"))
    paths = write_report(tmp_path, log=quiet, **FAST)
    names = {path.name for path in paths}
    assert {"results.csv", "summary.md", *PLOT_FILES.values()} == names
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths)
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in PLOT_FILES.values())
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary file left

    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    contract = ["method", "seed", "site", "heterogeneity", "condition", "role", "model_kind", "n_test", "n_healthy"]
    contract += ["auroc", "auroc_low", "auroc_high", "bal_acc_low", "sensitivity_high", "specificity_low"]
    contract += ["sens_at_spec80", "brier", "ece", "auroc_siemens", "bytes_sent_per_client_round", "shared_params"]
    assert set(contract) <= set(rows[0]) and list(rows[0]) == list(RESULT_COLUMNS)
    keys = [(r["condition"], r["method"], r["seed"], r["site"], r["model_kind"]) for r in rows]
    expected = [
        (record["condition"]["name"], record["method"], str(record["seed"]), site, kind)
        for record in records
        for site in record["sites"]
        for kind in KINDS[record["method"]]
    ]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
    for row in rows:  # not ECE: resampling biases it upward, so its percentile interval may lie above the estimate
        for metric in ("auroc", "bal_acc", "sensitivity", "specificity", "sens_at_spec80", "brier"):
            assert float(row[f"{metric}_low"]) <= float(row[metric]) <= float(row[f"{metric}_high"])
        assert row["n_test"] == "60" and int(row["n_healthy"]) in (15, 20)
    centralized = [row for row in rows if row["method"] == "centralized"]
    assert {row["bytes_sent_per_client_round"] for row in centralized} == {""}


def test_per_row_balanced_accuracy_uses_the_runs_own_threshold(tmp_path):
    record = make_record(HEADLINE, "fedit", 0)
    model = record["sites"]["ge"]["models"]["global"]
    model["threshold"] = 0.8
    write_record(record_path(tmp_path, HEADLINE.name, "fedit", 0), record)
    write_report(tmp_path, log=quiet, **FAST)
    with open(tmp_path / "results.csv", newline="") as handle:
        row = next(row for row in csv.DictReader(handle) if row["site"] == "ge")
    labels = np.array(record["sites"]["ge"]["test_labels"])
    expected = balanced_accuracy(labels, np.array(model["test"]), 0.8)
    assert float(row["bal_acc"]) == pytest.approx(float(expected))
    assert float(row["bal_acc"]) != pytest.approx(float(balanced_accuracy(labels, np.array(model["test"]), 0.5)))


# ---- validity ----


def test_a_failed_negative_control_marks_the_benchmark_invalid_before_anything_else(tmp_path):
    personalised_wins = {("personalised", site): 3.0 for site in SITES}
    write_runs(tmp_path, NEGATIVE_CONTROL, CONTROL_METHODS, strengths={"med_duallora": personalised_wins})
    write_runs(tmp_path, HEADLINE, KINDS)
    write_report(tmp_path, log=quiet, **FAST)
    text = summary(tmp_path)
    first_section = text.index("\n## ")
    assert "**INVALID" in text[:first_section] and "negative control failed" in text[:first_section]
    assert "**Negative control: FAIL**" in text


def test_controls_as_designed_pass_and_validate_the_benchmark(tmp_path):
    passing_controls(tmp_path)
    write_report(tmp_path, log=quiet, **FAST)
    text = summary(tmp_path)
    assert "**VALID" in text[: text.index("\n## ")]
    assert "**Negative control: PASS**" in text and "**Positive control: PASS**" in text
    assert "INVALID" not in text and "NOT YET VALIDATED" not in text


def test_missing_control_records_are_not_run_and_never_pass(tmp_path):
    write_runs(tmp_path, HEADLINE, KINDS)
    write_report(tmp_path, log=quiet, **FAST)
    text = summary(tmp_path)
    assert "**NOT YET VALIDATED" in text[: text.index("\n## ")]
    assert "**Negative control: NOT RUN**" in text and "**Positive control: NOT RUN**" in text
    assert "control: PASS" not in text and "**VALID" not in text


def test_the_negative_control_rests_on_med_duallora_alone_and_needs_its_records(tmp_path):
    """(b) local_only − fedit is shown but does not decide the zero-shift control: local_only trains on a quarter of
    the data, so it may lose at zero shift. Without med_duallora's records the control is not run."""
    write_runs(tmp_path, NEGATIVE_CONTROL, ("local_only",))
    write_report(tmp_path, log=quiet, **FAST)
    assert "**Negative control: NOT RUN**" in summary(tmp_path)
    write_runs(tmp_path, NEGATIVE_CONTROL, ("med_duallora",))  # fedit, comparison (b)'s global, absent
    write_report(tmp_path, log=quiet, **FAST)
    assert "**Negative control: PASS**" in summary(tmp_path)
    fedit_wins = {("global", site): 3.0 for site in SITES}  # local_only far below fedit: (b) fails, (a) holds
    write_runs(tmp_path, NEGATIVE_CONTROL, ("fedit",), strengths={"fedit": fedit_wins})
    write_report(tmp_path, log=quiet, **FAST)
    text = summary(tmp_path)
    assert "**Negative control: PASS**" in text and "local_only (personalised) − fedit (global)" in text


def test_negative_control_verdict_needs_every_interval_around_zero_and_a_small_mean():
    sites = ["a", "b"]
    around_zero = Effect(0.0, -0.01, 0.01, 1.0, 3, 60, 100)
    small_but_excluding = Effect(0.004, 0.001, 0.007, 0.01, 3, 60, 100)
    large_mean = Effect(0.03, -0.02, 0.08, 0.3, 3, 60, 100)
    assert negative_verdict({"c": {"a": around_zero, "b": around_zero}}, sites).status == "PASS"
    assert negative_verdict({"c": {"a": around_zero, "b": small_but_excluding}}, sites).status == "FAIL"
    assert negative_verdict({"c": {"a": large_mean, "b": large_mean}}, sites).status == "FAIL"
    assert negative_verdict({"c": {"a": around_zero}}, sites).status == "NOT RUN"
    assert negative_verdict({"c": {}, "d": {"a": large_mean, "b": around_zero}}, sites).status == "FAIL"
    assert negative_verdict({}, sites).status == "NOT RUN"


def test_positive_control_verdict_needs_a_clear_gain_at_the_shifted_site_only():
    sites = ["a", SHIFTED_SITE]
    flat = Effect(0.0, -0.01, 0.01, 1.0, 3, 60, 100)
    gain = Effect(0.08, 0.03, 0.13, 0.001, 3, 60, 100)
    unsure_gain = Effect(0.08, -0.01, 0.17, 0.1, 3, 60, 100)
    drift = Effect(0.03, -0.01, 0.07, 0.2, 3, 60, 100)
    assert positive_verdict({"c": {"a": flat, SHIFTED_SITE: gain}}, sites).status == "PASS"
    assert positive_verdict({"c": {"a": flat, SHIFTED_SITE: unsure_gain}}, sites).status == "FAIL"
    assert positive_verdict({"c": {"a": drift, SHIFTED_SITE: gain}}, sites).status == "FAIL"
    assert positive_verdict({"c": {"a": flat, SHIFTED_SITE: flat}, "d": {}}, sites).status == "NOT RUN"
    assert (
        positive_verdict({"c": {"a": flat, SHIFTED_SITE: flat}, "d": {"a": flat, SHIFTED_SITE: gain}}, sites).status
        == "PASS"
    )
    assert positive_verdict({"c": {"a": flat}}, ["a"]).status == "NOT RUN"


# ---- effects ----


def test_effects_are_paired_by_seed_and_subject_whatever_order_the_records_list_them_in(tmp_path):
    """A small gain shared by every subject is only visible paired: subjects stored in seed-specific orders must be
    matched by id, and seeds with seeds (each seed has its own per-subject noise)."""
    gain = {("personalised", site): 1.15 for site in SITES}
    records = write_runs(
        tmp_path, HEADLINE, ("med_duallora",), seeds=(0, 1, 2), strengths={"med_duallora": gain}, shuffle=True
    )
    benchmark = Benchmark.of(records)
    effects = benchmark_analysis.site_effects(
        benchmark, HEADLINE.name, benchmark_analysis.SWEEP_COMPARISONS[1], n_boot=300
    )
    assert set(effects) == set(SITES)
    for site, effect in effects.items():
        assert effect.low > 0 and effect.n_seeds == 3
        per_seed = []
        for record in records:
            entry = record["sites"][site]
            order = np.argsort(entry["test_ids"])
            ordered = np.array(entry["test_labels"])[order]
            scores = {kind: np.array(model["test"])[order] for kind, model in entry["models"].items()}
            per_seed.append(auroc(ordered, scores["personalised"]) - auroc(ordered, scores["global"]))
        assert effect.estimate == pytest.approx(float(np.mean(per_seed)))
    analysis = benchmark_analysis.analyse(benchmark, n_boot=300)
    assert [item.effect.low > 0 for item in analysis.effects] == [True] * len(SITES)


def test_primary_effects_have_holm_p_values_and_intervals_around_their_estimates(tmp_path):
    strengths = {"med_duallora": {("personalised", "ge"): 3.0}, "fedit": {("global", "ge"): 0.5}}
    records = write_runs(tmp_path, HEADLINE, KINDS, seeds=(0, 1, 2), strengths=strengths)
    analysis = benchmark_analysis.analyse(Benchmark.of(records), n_boot=300)
    labels = {item.comparison.label for item in analysis.effects}
    assert "med_duallora (personalised) − fedit (global)" in labels
    assert "med_duallora (personalised) − med_duallora (global)" in labels
    assert len(analysis.effects) == 4 * 4  # (3 other methods + own global) x 4 sites
    for item in analysis.effects:
        assert item.effect.low <= item.effect.estimate <= item.effect.high
        assert item.effect.p_value <= item.effect.p_holm <= 1
    at_ge = next(item for item in analysis.effects if item.site == "ge" and "− fedit" in item.comparison.label)
    assert at_ge.effect.low > 0 and at_ge.effect.p_holm < 0.05
    write_report(tmp_path, log=quiet, **FAST)
    text = summary(tmp_path)
    assert "| p (Holm) |" in text and "Holm family: all 16 rows" in text
    assert "med_duallora (personalised) − fedit (global) at ge: +" in text and ": significant" in text


def test_headline_rows_average_the_sites_and_find_the_worst_one(tmp_path):
    weak_at_canon = {("global", "canon"): 0.3}
    records = write_runs(tmp_path, HEADLINE, ("fedit",), seeds=(0, 1, 2), strengths={"fedit": weak_at_canon})
    (row,) = benchmark_analysis.headline_rows(Benchmark.of(records), HEADLINE.name, n_boot=300)
    per_site = {}
    for site in SITES:
        per_site[site] = np.mean(
            [auroc(r["sites"][site]["test_labels"], r["sites"][site]["models"]["global"]["test"]) for r in records]
        )
    assert row.metrics["auroc"].estimate == pytest.approx(np.mean(list(per_site.values())))
    assert row.metrics["worst_auroc"].estimate == pytest.approx(per_site["canon"])
    for name, effect in row.metrics.items():
        assert effect.low <= effect.estimate <= effect.high or name == "ece", name  # ECE: as in the test above


def test_variants_are_compared_with_their_base_on_common_seeds_and_kept_out_of_the_headline(tmp_path):
    records = write_runs(tmp_path, HEADLINE, ("med_duallora", "fedit"), seeds=(0, 1, 2))
    # fp16 scores exactly as its base (the same seeds' noise): ΔAUROC 0; int8 separates worse everywhere.
    records += write_runs(tmp_path, HEADLINE, ("med_duallora_fp16",), seeds=(0, 1))
    weak = {(kind, site): 0.2 for kind in KINDS["med_duallora"] for site in SITES}
    records += write_runs(
        tmp_path, HEADLINE, ("med_duallora_int8",), seeds=(0, 1, 2), strengths={"med_duallora_int8": weak}
    )
    records += write_runs(tmp_path, HEADLINE, ("med_duallora_dp8",), seeds=(0, 1))
    analysis = benchmark_analysis.analyse(Benchmark.of(records), n_boot=300)
    assert [row.method for row in analysis.headline_rows] == ["med_duallora", "fedit"]
    assert not any("fp16" in item.comparison.label or "int8" in item.comparison.label for item in analysis.effects)
    rows = {row.method: row for row in analysis.variants}
    assert list(rows) == ["med_duallora", "med_duallora_fp16", "med_duallora_int8", "med_duallora_dp8"]
    assert rows["med_duallora_dp8"].epsilon == pytest.approx(7.925) and rows["med_duallora_dp8"].delta == 1e-5
    assert rows["med_duallora"].epsilon is None
    assert all(row.seeds == [0, 1] and row.base == "med_duallora" for row in rows.values())
    assert rows["med_duallora"].delta_auroc is None
    assert rows["med_duallora_fp16"].delta_auroc.estimate == pytest.approx(0, abs=1e-12)
    assert rows["med_duallora_fp16"].metrics["auroc"].estimate == pytest.approx(
        rows["med_duallora"].metrics["auroc"].estimate
    )
    assert rows["med_duallora_int8"].delta_auroc.high < 0
    assert rows["med_duallora_int8"].bytes_per_round == 5e4
    assert rows["med_duallora_int8"].wall_s_per_round == pytest.approx(12.0 / (2 * 2))
    write_report(tmp_path, log=quiet, **FAST)
    text = summary(tmp_path)
    assert "## 10. Transport and privacy (h = 1)" in text and "| med_duallora_int8 | 0 1 |" in text
    assert "base (med_duallora)" in text and "7.93 at δ = 1e-05" in text and "— (no DP)" in text


def test_over_sites_draws_as_stats_does_and_pairs_exactly():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 1] * 20)
    sites = {site: (labels, [scores]) for site, scores in zip("abc", rng.random((3, 3, 60)), strict=True)}
    summary = over_sites(sites, n_boot=300, seed=4)
    assert summary.worst == worst_site_interval([(labels, m[0]) for labels, m in sites.values()], n_boot=300, seed=4)
    per_site = [auroc(labels, m[0]).mean() for labels, m in sites.values()]
    assert summary.mean.estimate == pytest.approx(np.mean(per_site)) and np.isnan(summary.mean.p_value)
    assert [effect.estimate for effect in summary.sites.values()] == pytest.approx(per_site)
    same = over_sites({site: (labels, [m[0], m[0]]) for site, (labels, m) in sites.items()}, n_boot=300)
    assert (same.mean.estimate, same.mean.low, same.mean.high, same.mean.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_deltas_equal_stats_paired_delta():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 1] * 20)
    models = dict(zip("xyz", rng.random((3, 2, 60)), strict=True))
    effects = paired_deltas(labels, models, [("x", "y"), ("z", "x")], n_boot=300, seed=2)
    assert effects == [
        paired_delta(labels, models["x"], models["y"], n_boot=300, seed=2),
        paired_delta(labels, models["z"], models["x"], n_boot=300, seed=2),
    ]


def test_decisions_binarise_each_seed_at_its_own_threshold():
    scored = Scored(
        np.array([0, 1, 1]), {0: 0.5, 1: 0.7}, {0: np.array([0.4, 0.6, 0.8]), 1: np.array([0.4, 0.6, 0.8])}
    )
    assert scored.matrix("decisions", [0, 1]).tolist() == [[0, 1, 1], [0, 0, 1]]


def test_records_of_one_condition_must_score_the_same_test_subjects(tmp_path):
    records = [make_record(HEADLINE, "fedit", 0), make_record(HEADLINE, "fedit", 1)]
    records[1]["sites"]["ge"]["test_ids"][0] = "ge-other"
    with pytest.raises(ValueError, match="h1.0/fedit seed 1: site ge's test subjects differ"):
        Benchmark.of(records)


# ---- partial and quick results ----


def test_a_headline_only_run_reports_what_is_missing(tmp_path):
    write_runs(tmp_path, HEADLINE, ("med_duallora", "fedit"), n_test=40)
    paths = write_report(tmp_path, log=quiet, **FAST)
    assert len(paths) == 2 + len(PLOT_FILES)
    text = summary(tmp_path)
    assert (
        "not run: h1.0/med_duallora_all_blocks" in text
        and "Not run yet at the headline: med_duallora_all_blocks" in text
    )
    assert "conditions without any record: h0.0, h0.0_iid, h0.0_iid_shift-ge, h0.5, h1.5" in text
    assert "none (quick smoke run)" in text
    assert "| 0.5 | not run | not run |" in text
    assert "not measured (no `probe_auroc_by_vendor` in sanity.json)" in text


def test_a_unit_is_complete_once_it_holds_the_default_seeds_whatever_other_units_hold(tmp_path):
    """The headline may run more seeds than the other parts: a sweep unit with seeds 0 1 2 is still complete."""
    write_runs(tmp_path, HEADLINE, ("med_duallora",), seeds=(0, 1, 2, 3), n_test=40)
    write_runs(tmp_path, HEADLINE, ("fedit",), seeds=(0, 1, 2), n_test=40)
    write_runs(tmp_path, HEADLINE, ("local_only",), seeds=(0, 1), n_test=40)
    write_report(tmp_path, log=quiet, **FAST)
    headline = next(line for line in summary(tmp_path).splitlines() if line.startswith("- part `headline`"))
    assert headline.startswith(f"- part `headline`: 2 of {len(METHODS)} units complete (seeds 0 1; 0 1 2; 0 1 2 3)")
    assert "without every seed of 0 1 2: h1.0/local_only (seeds 0 1)" in headline


def test_preregistration_and_sanity_files_are_reported(tmp_path):
    write_runs(tmp_path, HEADLINE, ("fedit",))
    preregistration = {"chosen": {"rounds": 5}, "criterion": "mean validation AUROC", "written_at": "2025-01-01"}
    (tmp_path / "preregistration.json").write_text(json.dumps(preregistration))
    sanity = {"probe_auroc_by_vendor": {"ge": {"auroc": 0.81, "n": 300}}, "vendor_id_accuracy": {"0.0": 0.27}}
    (tmp_path / "sanity.json").write_text(json.dumps(sanity))
    write_report(tmp_path, log=quiet, **FAST)
    text = summary(tmp_path)
    assert '- chosen: `{"rounds": 5}`' in text and "written at: 2025-01-01" in text
    assert "| ge | 0.810 | 300 | n/a |" in text and "| 0.0 | 0.270 |" in text


def test_an_empty_results_folder_still_gets_a_report(tmp_path):
    paths = write_report(tmp_path, log=quiet, **FAST)
    assert all(path.is_file() for path in paths)
    assert "0 records" in summary(tmp_path) and "**NOT YET VALIDATED" in summary(tmp_path)
