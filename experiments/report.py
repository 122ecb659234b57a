"""The benchmark's report from its run records: results.csv, summary.md (the controls first) and the PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from data_prep.splits import REFERENCE_TEST_SPLIT
from experiments import plots, stats
from experiments.design import PARTS, SHIFTED_SITE, SWEEP_HETEROGENEITY
from experiments.preregistration import read_preregistration
from experiments.records import read_records
from experiments.runs import METHODS
from experiments.sanity import SANITY_FILE
from experiments.significance import PairedTest, paired_wilcoxon
from models.atomic_io import write_text_atomic
from models.protocol import SITES

Record = Mapping[str, Any]
Log = Callable[[str], None]

REFERENCE = "med_duallora"
GLOBAL_BASELINE = "fedit"
KIND_ORDER = ("personalised", "global", "central")
"""A method's primary (scored) model: personalised where it has one, else global, else central."""
ROW_N_BOOT = 200
"""Replicates of each results.csv interval (one run at one site): bounds good to about ±0.005 AUROC at 300 subjects,
and the ~6,000 intervals of a full benchmark take seconds, not minutes. summary.md's intervals use stats.N_BOOT."""
ALPHA = 0.05
NEGATIVE_MAX_MEAN = 0.01
POSITIVE_MIN_DELTA = 0.05
POSITIVE_MAX_OTHER = 0.02
HALF_WIDTH_TARGET = 0.05
MIN_SPECIFICITY = 0.8
RELIABILITY_METHODS = ("med_duallora", "fedit", "local_only", "centralized")
PLOT_FILES = {
    "sweep": "delta_auroc_vs_h.png",
    "forest": "effects_forest.png",
    "bytes": "auroc_vs_bytes.png",
    "rounds": "val_auroc_per_round.png",
    "reliability": "reliability.png",
}


@dataclass(frozen=True)
class MetricSpec:
    """A headline metric: its column, its function (stats' conventions) and what it is computed on: `test` scores,
    `decisions` (each seed's test scores binarised at its own validation threshold) or `siemens` scores."""

    name: str
    title: str
    function: stats.Metric
    source: str


METRICS = (
    MetricSpec("auroc", "AUROC", stats.auroc, "test"),
    MetricSpec("bal_acc", "balanced accuracy", stats.balanced_accuracy, "decisions"),
    MetricSpec("sensitivity", "sensitivity", stats.sensitivity, "decisions"),
    MetricSpec("specificity", "specificity", stats.specificity, "decisions"),
    MetricSpec(
        "sens_at_spec80",
        "sensitivity at specificity 0.8",
        partial(stats.sensitivity_at_specificity, min_specificity=MIN_SPECIFICITY),
        "test",
    ),
    MetricSpec("brier", "Brier score", stats.brier, "test"),
    MetricSpec("ece", "ECE", stats.expected_calibration_error, "test"),
    MetricSpec("auroc_siemens", "AUROC on the Siemens-profile renderings", stats.auroc, "siemens"),
)
SUMMARY_METRICS = tuple(metric for metric in METRICS if metric.source != "siemens")
ID_COLUMNS = (
    "method",
    "seed",
    "site",
    "heterogeneity",
    "iid_sites",
    "concept_shift",
    "condition",
    "role",
    "model_kind",
    "primary",
    "threshold",
    "n_test",
    "n_healthy",
)
COST_COLUMNS = (
    "bytes_sent_per_client_round",
    "params_total",
    "params_trainable",
    "shared_params",
    "job_wall_s",
    "seeds_in_job",
)
RESULT_COLUMNS = (
    *ID_COLUMNS,
    *(f"{metric.name}{suffix}" for metric in METRICS for suffix in ("", "_low", "_high")),
    *COST_COLUMNS,
)


@dataclass(frozen=True)
class Comparison:
    """`a` minus `b`, each a (method, model kind), paired by seed and test subject."""

    a: tuple[str, str]
    b: tuple[str, str]

    @property
    def label(self) -> str:
        return f"{self.a[0]} ({self.a[1]}) − {self.b[0]} ({self.b[1]})"


CONTROL_COMPARISONS = (
    Comparison((REFERENCE, "personalised"), (REFERENCE, "global")),
    Comparison(("local_only", "personalised"), (GLOBAL_BASELINE, "global")),
)
"""(a) med_duallora's personalised model against its own global-only model (same run); (b) local_only against
fedit's global model (experiments.design.CONTROL_METHODS)."""
NEGATIVE_CONTROL_COMPARISONS = (CONTROL_COMPARISONS[0].label,)
"""What the negative control's verdict rests on: (a) only. (b) is shown, but local_only trains on a quarter of the
data fedit's global model sees, so at zero shift it is expected to lose: that is not a failed control."""
SWEEP_COMPARISONS = (
    Comparison((REFERENCE, "personalised"), (GLOBAL_BASELINE, "global")),
    Comparison((REFERENCE, "personalised"), (REFERENCE, "global")),
)


# ---- the records, indexed: every scored model's scores aligned by test subject ----


@dataclass
class Scored:
    """One scored model (condition, method, kind) at one site: per seed its validation threshold and its scores in
    the order of the site's test subjects `labels`, on their own rendering (`test`) and the Siemens one (`siemens`)."""

    labels: np.ndarray
    thresholds: dict[int, float] = field(default_factory=dict)
    test: dict[int, np.ndarray] = field(default_factory=dict)
    siemens: dict[int, np.ndarray] = field(default_factory=dict)

    def seeds(self, source: str = "test") -> set[int]:
        return set(self.siemens if source == "siemens" else self.test)

    def matrix(self, source: str, seeds: Sequence[int]) -> np.ndarray:
        """(n_seeds, n_subjects): `test` or `siemens` scores, or `decisions` (test score > the seed's threshold)."""
        if source == "decisions":
            return np.stack([(self.test[seed] > self.thresholds[seed]).astype(np.float64) for seed in seeds])
        return np.stack([(self.siemens if source == "siemens" else self.test)[seed] for seed in seeds])


@dataclass
class Benchmark:
    """The records indexed: conditions by name, each site's test subjects, every scored model by (condition, method,
    kind, site)."""

    records: list[Record]
    conditions: dict[str, Record] = field(default_factory=dict)
    subjects: dict[tuple[str, str], tuple[list[str], np.ndarray]] = field(default_factory=dict)
    models: dict[tuple[str, str, str, str], Scored] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Iterable[Record]) -> Benchmark:
        benchmark = cls(list(records))
        for record in benchmark.records:
            benchmark._add(record)
        return benchmark

    def _add(self, record: Record) -> None:
        condition, method, seed = record["condition"]["name"], record["method"], int(record["seed"])
        self.conditions.setdefault(condition, record["condition"])
        for site, entry in record["sites"].items():
            order, labels = self._aligned(record, site, entry)
            for kind, model in entry["models"].items():
                scored = self.models.setdefault((condition, method, kind, site), Scored(labels))
                scored.thresholds[seed] = float(model["threshold"])
                scored.test[seed] = np.asarray(model["test"], dtype=np.float64)[order]
                if REFERENCE_TEST_SPLIT in model:
                    scored.siemens[seed] = np.asarray(model[REFERENCE_TEST_SPLIT], dtype=np.float64)[order]

    def _aligned(self, record: Record, site: str, entry: Record) -> tuple[np.ndarray, np.ndarray]:
        """The record's subject order that matches the condition's (the first record's) at this site, and labels."""
        key = (record["condition"]["name"], site)
        ids, labels = entry["test_ids"], np.asarray(entry["test_labels"], dtype=np.int64)
        reference_ids, reference_labels = self.subjects.setdefault(key, (list(ids), labels))
        position = {subject: index for index, subject in enumerate(ids)}
        if set(position) != set(reference_ids) or len(position) != len(ids):
            raise ValueError(
                f"{_run_name(record)}: site {site}'s test subjects differ from the other runs' of {key[0]}"
            )
        order = np.array([position[subject] for subject in reference_ids], dtype=np.int64)
        if not np.array_equal(labels[order], reference_labels):
            raise ValueError(f"{_run_name(record)}: site {site}'s test labels differ from the other runs' of {key[0]}")
        return order, reference_labels

    def of_role(self, *roles: str) -> list[str]:
        return [name for name, condition in self.conditions.items() if condition["role"] in roles]

    def methods(self, condition: str) -> list[str]:
        present = {method for name, method, _, _ in self.models if name == condition}
        return [method for method in METHODS if method in present] + sorted(present - set(METHODS))

    def sites(self, condition: str) -> list[str]:
        present = {site for name, site in self.subjects if name == condition}
        return [site for site in SITES if site in present] + sorted(present - set(SITES))

    def kinds(self, condition: str, method: str) -> set[str]:
        return {kind for name, other, kind, _ in self.models if (name, other) == (condition, method)}

    def primary_kind(self, condition: str, method: str) -> str | None:
        return primary_kind(self.kinds(condition, method))

    def scored(self, condition: str, side: tuple[str, str], site: str) -> Scored | None:
        return self.models.get((condition, *side, site))

    def runs(self, condition: str, method: str) -> list[Record]:
        return [
            record for record in self.records if (record["condition"]["name"], record["method"]) == (condition, method)
        ]


def primary_kind(kinds: Iterable[str]) -> str | None:
    """The model a method is compared on: personalised where it has one, else global, else central."""
    available = set(kinds)
    return next((kind for kind in KIND_ORDER if kind in available), None)


def _run_name(record: Record) -> str:
    return f"{record['condition']['name']}/{record['method']} seed {record['seed']}"


# ---- results.csv: one row per method x seed x site x model kind x condition ----


def result_rows(records: Sequence[Record], n_boot: int = ROW_N_BOOT) -> list[dict[str, Any]]:
    """Every scored model of every run at every site, with each metric's interval over that site's test subjects."""
    rows = []
    for record in records:
        condition = record["condition"]
        primary = primary_kind(kind for entry in record["sites"].values() for kind in entry["models"])
        for site, entry in record["sites"].items():
            labels = np.asarray(entry["test_labels"], dtype=np.int64)
            for kind, model in entry["models"].items():
                row = {
                    "method": record["method"],
                    "seed": record["seed"],
                    "site": site,
                    **{key: condition.get(key) for key in ("heterogeneity", "iid_sites", "concept_shift", "role")},
                    "condition": condition["name"],
                    "model_kind": kind,
                    "primary": kind == primary,
                    "threshold": model["threshold"],
                    "n_test": int(labels.size),
                    "n_healthy": int(np.sum(labels == 0)),
                }
                rows.append(row | _row_metrics(labels, model, n_boot) | _cost_columns(record["cost"]))
    return rows


def _row_metrics(labels: np.ndarray, model: Record, n_boot: int) -> dict[str, float]:
    """Every metric of one run's model at one site with its interval (stats.metric_interval with one seed)."""
    test = np.asarray(model["test"], dtype=np.float64)
    sources = {"test": test, "decisions": (test > model["threshold"]).astype(np.float64)}
    if REFERENCE_TEST_SPLIT in model:
        sources["siemens"] = np.asarray(model[REFERENCE_TEST_SPLIT], dtype=np.float64)
    values = {}
    for metric in METRICS:
        if metric.source not in sources:
            values |= dict.fromkeys((metric.name, f"{metric.name}_low", f"{metric.name}_high"), math.nan)
            continue
        effect = stats.metric_interval(labels, sources[metric.source][None, :], metric.function, n_boot=n_boot)
        values |= {metric.name: effect.estimate, f"{metric.name}_low": effect.low, f"{metric.name}_high": effect.high}
    return values


def _cost_columns(cost: Record) -> dict[str, Any]:
    params = cost.get("params", {})
    return {
        "bytes_sent_per_client_round": cost.get("bytes_sent_per_client_round"),
        "params_total": params.get("total"),
        "params_trainable": params.get("trainable"),
        "shared_params": params.get("shared"),
        "job_wall_s": cost.get("job_wall_s"),
        "seeds_in_job": cost.get("seeds_in_job"),
    }


def results_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """results.csv's text: RESULT_COLUMNS, floats at full precision, missing values empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _csv_value(row.get(column)) for column in RESULT_COLUMNS})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


# ---- effects over sites ----


@dataclass(frozen=True)
class OverSites:
    """A seed-mean metric, or a paired difference, at each site (`sites`), its mean over the sites and its minimum."""

    mean: stats.Effect
    worst: stats.Effect
    sites: dict[str, stats.Effect]


def over_sites(
    sites: Mapping[str, tuple[ArrayLike, Sequence[ArrayLike]]],
    metric: stats.Metric = stats.auroc,
    n_boot: int = stats.N_BOOT,
    seed: int = 0,
) -> OverSites:
    """The seed-mean metric of one score matrix (n_seeds, n_subjects) per site, or the paired difference a - b of
    two, each site its own test set: per site, mean over sites and minimum, all from one hierarchical bootstrap.

    The resampling is stats.worst_site_interval's (seeds once for every site, each site's subjects independently,
    the same draws for the same seed, so `worst` equals worst_site_interval's); a difference gets stats' two-sided
    bootstrap p. Built on stats' internals because stats has the minimum only; it belongs in stats.
    """
    checked = {site: stats._checked(labels, *matrices) for site, (labels, matrices) in sites.items()}
    n_seeds = {matrices[0].shape[0] for _, matrices in checked.values()}
    if len(n_seeds) != 1:
        raise ValueError(f"every site needs the same seeds, got seed counts {sorted(n_seeds)}")
    rng = np.random.default_rng(seed)
    seeds = stats._seed_draws(rng, n_seeds.pop(), n_boot)
    paired = any(len(matrices) == 2 for _, matrices in checked.values())
    estimates, replicates, per_site = [], [], {}
    for site, (labels, matrices) in checked.items():
        subjects = stats._subject_draws(rng, labels, n_boot)
        points = [metric(labels, scores).mean() for scores in matrices]
        draws = [stats._replicates(labels, scores, metric, seeds, subjects) for scores in matrices]
        estimates.append(points[0] - points[1] if paired else points[0])
        replicates.append(draws[0] - draws[1] if paired else draws[0])
        per_site[site] = _effect(estimates[-1], replicates[-1], (seeds.shape[1], labels.size), paired)
    sizes = (seeds.shape[1], sum(labels.size for labels, _ in checked.values()))
    return OverSites(
        mean=_effect(np.mean(estimates), np.mean(replicates, axis=0), sizes, paired),
        worst=_effect(min(estimates), np.min(replicates, axis=0), sizes, paired),
        sites=per_site,
    )


def paired_deltas(
    labels: ArrayLike,
    models: Mapping[Any, ArrayLike],
    pairs: Sequence[tuple[Any, Any]],
    n_boot: int = stats.N_BOOT,
    seed: int = 0,
) -> list[stats.Effect]:
    """stats.paired_delta (AUROC) of each pair of `models` (score matrices on one test set, the same seeds), each
    model's replicates computed once: the draws are paired_delta's for the same seed, so each effect equals its
    paired_delta. Built on stats' internals for speed (a model is in many comparisons); it belongs in stats."""
    labels, matrices = stats._checked(labels, *models.values())
    rng = np.random.default_rng(seed)
    seeds = stats._seed_draws(rng, matrices[0].shape[0], n_boot)
    subjects = stats._subject_draws(rng, labels, n_boot)
    needed = {key for pair in pairs for key in pair}
    points = {key: stats.auroc(labels, scores).mean() for key, scores in zip(models, matrices, strict=True)}
    draws = {
        key: stats._replicates(labels, scores, stats.auroc, seeds, subjects)
        for key, scores in zip(models, matrices, strict=True)
        if key in needed
    }
    return [_effect(points[a] - points[b], draws[a] - draws[b], matrices[0].shape, True) for a, b in pairs]


def _effect(estimate: float, replicates: np.ndarray, sizes: tuple[int, int], paired: bool) -> stats.Effect:
    return stats._effect(float(estimate), replicates, sizes, stats._bootstrap_p(replicates) if paired else math.nan)


def across_sites(
    benchmark: Benchmark, condition: str, sides: Sequence[tuple[str, str]], source: str = "test"
) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Per site where every side (method, kind) has a model: the labels and each side's score matrix, on the seeds
    that every side has at every one of those sites (a seed is one run for all sites)."""
    models = {site: [benchmark.scored(condition, side, site) for side in sides] for site in benchmark.sites(condition)}
    models = {site: row for site, row in models.items() if all(row)}
    seeds = common_seeds([model for row in models.values() for model in row], source)
    if not seeds:
        return {}
    return {site: (row[0].labels, [model.matrix(source, seeds) for model in row]) for site, row in models.items()}


def common_seeds(models: Sequence[Scored], source: str = "test") -> list[int]:
    """The seeds every model was scored with."""
    return sorted(set.intersection(*(model.seeds(source) for model in models))) if models else []


def paired_models(
    benchmark: Benchmark, condition: str, comparison: Comparison
) -> dict[str, tuple[Scored, Scored, list[int]]]:
    """Per site where both sides have a model with a seed in common: the two models and their common seeds."""
    pairs = {}
    for site in benchmark.sites(condition):
        a, b = benchmark.scored(condition, comparison.a, site), benchmark.scored(condition, comparison.b, site)
        seeds = common_seeds([a, b]) if a and b else []
        if seeds:
            pairs[site] = (a, b, seeds)
    return pairs


def site_effects(
    benchmark: Benchmark, condition: str, comparison: Comparison, n_boot: int = stats.N_BOOT
) -> dict[str, stats.Effect]:
    """Per site where both sides have a model: ΔAUROC a - b over their common seeds (stats.paired_delta)."""
    return {
        site: stats.paired_delta(a.labels, a.matrix("test", seeds), b.matrix("test", seeds), n_boot=n_boot)
        for site, (a, b, seeds) in paired_models(benchmark, condition, comparison).items()
    }


def holm_n_boot(family_size: int, n_boot: int) -> int:
    """Replicates for a Holm family of bootstrap p-values: at least `n_boot`, and enough that the smallest p a
    replicate count allows, 2 / (B + 1), times the family's size is at most ALPHA / 2, so that a clear effect can be
    significant after the adjustment (with 2,000 replicates, a family of 50 could never be)."""
    return max(n_boot, math.ceil(4 * family_size / ALPHA) - 1)


# ---- 1. validity: the controls ----


@dataclass(frozen=True)
class Verdict:
    """A control's outcome, `PASS`, `FAIL` or `NOT RUN` (records missing: the benchmark is not yet validated), with
    the figures it rests on."""

    status: str
    lines: tuple[str, ...]


def negative_verdict(effects: Mapping[str, Mapping[str, stats.Effect]], sites: Sequence[str]) -> Verdict:
    """Zero shift: for each comparison, every site's interval contains 0 and the mean over the sites of the per-site
    ΔAUROC estimates lies within ±NEGATIVE_MAX_MEAN. A failing comparison fails the control; otherwise one without an
    effect at every site leaves it NOT RUN."""
    lines, failed, missing = [], False, not effects
    for label, per_site in effects.items():
        if not sites or set(per_site) != set(sites):
            missing = True
            lines.append(f"{label}: not run ({_missing_sites(per_site, sites)})")
            continue
        mean = float(np.mean([effect.estimate for effect in per_site.values()]))
        excluding = [site for site, effect in per_site.items() if not effect.low <= 0 <= effect.high]
        passed = not excluding and abs(mean) <= NEGATIVE_MAX_MEAN
        failed |= not passed
        lines.append(
            f"{label}: {'pass' if passed else 'FAIL'}: mean over the {len(per_site)} sites of the per-site ΔAUROC "
            f"estimates {mean:+.4f} (|mean| ≤ {NEGATIVE_MAX_MEAN} needed); intervals excluding 0: "
            f"{', '.join(excluding) or 'none'}; {_per_site_text(per_site)}"
        )
    return Verdict("FAIL" if failed else "NOT RUN" if missing else "PASS", tuple(lines))


def positive_verdict(
    effects: Mapping[str, Mapping[str, stats.Effect]], sites: Sequence[str], shifted: str = SHIFTED_SITE
) -> Verdict:
    """Concept shift at `shifted`: some comparison has ΔAUROC ≥ POSITIVE_MIN_DELTA there with an interval above 0,
    and |ΔAUROC| ≤ POSITIVE_MAX_OTHER at every other site. FAIL only when every comparison was run and none passes."""
    lines, passed, missing = [], False, not effects
    expected = list(sites) + ([shifted] if sites and shifted not in sites else [])
    for label, per_site in effects.items():
        if not expected or set(per_site) != set(expected):
            missing = True
            lines.append(f"{label}: not run ({_missing_sites(per_site, expected)})")
            continue
        at_shift = per_site[shifted]
        shift_ok = at_shift.estimate >= POSITIVE_MIN_DELTA and at_shift.low > 0
        off = [
            site for site, effect in per_site.items() if site != shifted and abs(effect.estimate) > POSITIVE_MAX_OTHER
        ]
        passed |= shift_ok and not off
        lines.append(
            f"{label}: {'pass' if shift_ok and not off else 'fail'}: at {shifted} "
            f"{_effect_text(at_shift, signed=True)} "
            f"(≥ +{POSITIVE_MIN_DELTA} with the interval above 0 needed: {'yes' if shift_ok else 'no'}); other sites "
            f"with |Δ| > {POSITIVE_MAX_OTHER}: {', '.join(off) or 'none'}; {_per_site_text(per_site)}"
        )
    return Verdict("PASS" if passed else "NOT RUN" if missing else "FAIL", tuple(lines))


def control_effects(
    benchmark: Benchmark, role: str, n_boot: int
) -> tuple[dict[str, dict[str, stats.Effect]], list[str]]:
    """Each control comparison's per-site effects in the condition of `role`, and that condition's sites."""
    names = benchmark.of_role(role)
    if not names:
        return {comparison.label: {} for comparison in CONTROL_COMPARISONS}, []
    return (
        {
            comparison.label: site_effects(benchmark, names[0], comparison, n_boot)
            for comparison in CONTROL_COMPARISONS
        },
        benchmark.sites(names[0]),
    )


def _missing_sites(per_site: Mapping[str, stats.Effect], sites: Sequence[str]) -> str:
    if not sites:
        return "no records of this control"
    return f"no paired records at {', '.join(site for site in sites if site not in per_site)}"


def _per_site_text(per_site: Mapping[str, stats.Effect]) -> str:
    return "; ".join(f"{site} {_effect_text(effect, signed=True)}" for site, effect in per_site.items())


def validity_banner(verdicts: Mapping[str, Verdict]) -> str:
    """The line printed first: INVALID when a control failed, NOT YET VALIDATED when one was not run, else VALID."""
    failed = [name for name, verdict in verdicts.items() if verdict.status == "FAIL"]
    not_run = [name for name, verdict in verdicts.items() if verdict.status == "NOT RUN"]
    if failed:
        return (
            f"**INVALID: the {' and the '.join(failed)} control failed. This is a failed check of the benchmark, "
            "not a negative result: nothing below is evidence for or against any method.**"
        )
    if not_run:
        return (
            f"**NOT YET VALIDATED: the {' and the '.join(not_run)} control "
            f"{'has' if len(not_run) == 1 else 'have'} not been run (completely); no result below is validated yet.**"
        )
    return "**VALID: the negative and the positive control both pass.**"


def validity_section(verdicts: Mapping[str, Verdict]) -> list[str]:
    lines = [
        "## 1. Validity (controls)",
        "",
        f"Negative control (zero shift; condition role `negative control`, h = 0, i.i.d. sites): PASS iff, for each "
        f"comparison, every site's 95 % interval contains 0 and the mean over sites of the per-site ΔAUROC "
        f"estimates is within ±{NEGATIVE_MAX_MEAN}. Positive control (concept shift at `{SHIFTED_SITE}`; role "
        f"`positive control`): PASS iff comparison (a) or (b) has ΔAUROC ≥ +{POSITIVE_MIN_DELTA} at "
        f"{SHIFTED_SITE} with an interval excluding 0 and |ΔAUROC| ≤ {POSITIVE_MAX_OTHER} at the other sites. "
        "(a) is med_duallora's personalised model against its own global-only model (same run), (b) local_only "
        "against fedit's global model; both paired by seed and test subject (stats.paired_delta).",
        "",
    ]
    for name, verdict in verdicts.items():
        lines += [f"- **{name} control: {verdict.status}**"] + [f"  - {line}" for line in verdict.lines]
    return lines + [""]


# ---- 3-7: headline, per-site AUROC, primary effects, gap closure, sweep ----


@dataclass(frozen=True)
class HeadlineRow:
    """One method at the headline: its primary model's metrics, mean over sites (`worst_auroc`: the worst site's
    AUROC), its AUROC at each site, its uplink bytes per client per round (None: not federated) and shared
    parameters."""

    method: str
    kind: str
    metrics: dict[str, stats.Effect]
    site_auroc: dict[str, stats.Effect]
    bytes_per_round: float | None
    shared_params: int | None


@dataclass(frozen=True)
class SiteEffect:
    comparison: Comparison
    site: str
    effect: stats.Effect


@dataclass(frozen=True)
class Analysis:
    """Every figure summary.md and the plots show, computed once from the records."""

    verdicts: dict[str, Verdict]
    controls: dict[str, dict[str, dict[str, stats.Effect]]]
    headline: str | None
    headline_rows: list[HeadlineRow]
    effects: list[SiteEffect]
    wilcoxon: dict[str, PairedTest]
    gaps: dict[str, dict[str, stats.Effect | None]]
    sweep: dict[str, dict[float, stats.Effect]]


def analyse(benchmark: Benchmark, n_boot: int = stats.N_BOOT) -> Analysis:
    negative, negative_sites = control_effects(benchmark, "negative control", n_boot)
    positive, positive_sites = control_effects(benchmark, "positive control", n_boot)
    headline = next(iter(benchmark.of_role("headline")), None)
    comparisons = primary_comparisons(benchmark, headline) if headline else []
    return Analysis(
        verdicts={
            "negative": negative_verdict(
                {label: negative[label] for label in NEGATIVE_CONTROL_COMPARISONS}, negative_sites
            ),
            "positive": positive_verdict(positive, positive_sites),
        },
        controls={"negative control": negative, "positive control": positive},
        headline=headline,
        headline_rows=headline_rows(benchmark, headline, n_boot) if headline else [],
        effects=primary_effects(benchmark, headline, comparisons, n_boot) if headline else [],
        wilcoxon={comparison.label: wilcoxon(benchmark, headline, comparison) for comparison in comparisons},
        gaps=gap_closures(benchmark, headline, n_boot) if headline else {},
        sweep=sweep_effects(benchmark, n_boot),
    )


def headline_rows(benchmark: Benchmark, condition: str, n_boot: int) -> list[HeadlineRow]:
    rows = []
    for method in benchmark.methods(condition):
        side = (method, benchmark.primary_kind(condition, method))
        summaries = {
            metric.name: over_sites(across_sites(benchmark, condition, [side], metric.source), metric.function, n_boot)
            for metric in SUMMARY_METRICS
        }
        metrics = {name: summary.mean for name, summary in summaries.items()} | {
            "worst_auroc": summaries["auroc"].worst
        }
        costs = [record["cost"] for record in benchmark.runs(condition, method)]
        sent = [cost["bytes_sent_per_client_round"] for cost in costs]
        sent = [value for value in sent if value is not None]
        shared = next((cost["params"]["shared"] for cost in costs if cost["params"].get("shared") is not None), None)
        bytes_per_round = float(np.mean(sent)) if sent else None
        rows.append(HeadlineRow(method, side[1], metrics, summaries["auroc"].sites, bytes_per_round, shared))
    return rows


def primary_comparisons(benchmark: Benchmark, condition: str) -> list[Comparison]:
    """med_duallora's personalised model against each other method's primary model, then every method's personalised
    model against its own global-only model."""
    methods = benchmark.methods(condition)
    comparisons = []
    if "personalised" in benchmark.kinds(condition, REFERENCE):
        reference = (REFERENCE, "personalised")
        for method in methods:
            if method != REFERENCE:
                comparisons.append(Comparison(reference, (method, benchmark.primary_kind(condition, method))))
    for method in methods:
        if {"personalised", "global"} <= benchmark.kinds(condition, method):
            comparisons.append(Comparison((method, "personalised"), (method, "global")))
    return comparisons


def primary_effects(
    benchmark: Benchmark, condition: str, comparisons: Sequence[Comparison], n_boot: int
) -> list[SiteEffect]:
    """Every comparison at every site, Holm-adjusted as one family (replicates: holm_n_boot); the comparisons of a
    site on the same seeds share their draws (paired_deltas)."""
    groups: dict[tuple[str, tuple[int, ...]], list[Comparison]] = {}
    for comparison in comparisons:
        for site, (_, _, seeds) in paired_models(benchmark, condition, comparison).items():
            groups.setdefault((site, tuple(seeds)), []).append(comparison)
    replicates = holm_n_boot(sum(len(group) for group in groups.values()), n_boot)
    found = []
    for (site, seeds), group in groups.items():
        sides = {side: benchmark.scored(condition, side, site) for c in group for side in (c.a, c.b)}
        models = {side: scored.matrix("test", list(seeds)) for side, scored in sides.items()}
        labels = next(iter(sides.values())).labels
        effects = paired_deltas(labels, models, [(c.a, c.b) for c in group], replicates)
        found += [SiteEffect(c, site, effect) for c, effect in zip(group, effects, strict=True)]
    found.sort(key=lambda item: (comparisons.index(item.comparison), benchmark.sites(condition).index(item.site)))
    adjusted = stats.holm_effects([item.effect for item in found])
    return [SiteEffect(item.comparison, item.site, effect) for item, effect in zip(found, adjusted, strict=True)]


def wilcoxon(benchmark: Benchmark, condition: str, comparison: Comparison) -> PairedTest:
    """Wilcoxon signed-rank test on the per-run AUROC differences a - b over every (seed, site) pair."""
    differences = [
        float(stats.auroc(a.labels, a.test[seed]) - stats.auroc(b.labels, b.test[seed]))
        for a, b, seeds in paired_models(benchmark, condition, comparison).values()
        for seed in seeds
    ]
    return paired_wilcoxon(comparison.a[0], comparison.b[0], differences)


def gap_closures(benchmark: Benchmark, condition: str, n_boot: int) -> dict[str, dict[str, stats.Effect | None]]:
    """Per method with a personalised and a global model, per site: stats.gap_closure, the reference being the global
    model on the Siemens-profile renderings (None: those scores were not recorded)."""
    gaps: dict[str, dict[str, stats.Effect | None]] = {}
    for method in benchmark.methods(condition):
        if not {"personalised", "global"} <= benchmark.kinds(condition, method):
            continue
        for site in benchmark.sites(condition):
            personalised = benchmark.scored(condition, (method, "personalised"), site)
            global_ = benchmark.scored(condition, (method, "global"), site)
            if not (personalised and global_):
                continue
            seeds = sorted(set(common_seeds([personalised, global_])) & global_.seeds("siemens"))
            gaps.setdefault(method, {})[site] = (
                stats.gap_closure(
                    personalised.labels,
                    personalised.matrix("test", seeds),
                    global_.matrix("test", seeds),
                    global_.matrix("siemens", seeds),
                    n_boot=n_boot,
                )
                if seeds
                else None
            )
    return gaps


def sweep_effects(benchmark: Benchmark, n_boot: int) -> dict[str, dict[float, stats.Effect]]:
    """Per sweep comparison and heterogeneity h (sweep and headline conditions): ΔAUROC mean over sites."""
    sweep: dict[str, dict[float, stats.Effect]] = {comparison.label: {} for comparison in SWEEP_COMPARISONS}
    for condition in benchmark.of_role("sweep", "headline"):
        h = float(benchmark.conditions[condition]["heterogeneity"])
        for comparison in SWEEP_COMPARISONS:
            per_site = across_sites(benchmark, condition, [comparison.a, comparison.b])
            if per_site:
                sweep[comparison.label][h] = over_sites(per_site, n_boot=n_boot).mean
    return sweep


# ---- summary.md ----


def summary_markdown(
    benchmark: Benchmark, analysis: Analysis, preregistration: Record | None, sanity: Record | None
) -> str:
    """summary.md: validity first, then coverage, pre-registration, headline, per-site AUROC, primary effects, gap
    closure, sweep, sanity checks, the mechanical verdicts, the methods and the plots."""
    lines = ["# Benchmark report", "", validity_banner(analysis.verdicts), ""]
    lines += validity_section({name.capitalize(): verdict for name, verdict in analysis.verdicts.items()})
    lines += coverage_section(benchmark)
    lines += preregistration_section(preregistration, benchmark)
    lines += headline_section(analysis)
    lines += site_auroc_section(analysis)
    lines += effects_section(analysis)
    lines += gap_section(analysis)
    lines += sweep_section(analysis)
    lines += sanity_section(benchmark, sanity)
    lines += verdicts_section(analysis)
    lines += methods_section(benchmark)
    lines += ["## Plots", ""] + [f"- `{name}`" for name in PLOT_FILES.values()] + [""]
    return "\n".join(lines)


def coverage_section(benchmark: Benchmark) -> list[str]:
    """Which parts, conditions and methods have records, for every seed found, and which are missing."""
    seeds: dict[tuple[str, str], set[int]] = {}
    for record in benchmark.records:
        seeds.setdefault((record["condition"]["name"], record["method"]), set()).add(int(record["seed"]))
    all_seeds = set().union(*seeds.values())
    sizes = sorted({json.dumps(record.get("cohort", {}).get("test_per_site")) for record in benchmark.records})
    lines = [
        "## Coverage",
        "",
        f"{len(benchmark.records)} records; seeds {_list(sorted(all_seeds))}; test subjects per site {_list(sizes)}.",
        "",
    ]
    for part, units in PARTS.items():
        keys = {unit.name: (unit.condition.name, unit.method) for unit in units}
        missing = [name for name, key in keys.items() if key not in seeds]
        partial = [
            f"{name} (seeds {_list(sorted(seeds[key]))})"
            for name, key in keys.items()
            if key in seeds and seeds[key] != all_seeds
        ]
        line = f"- part `{part}`: {len(units) - len(missing) - len(partial)} of {len(units)} units complete"
        line += f"; not run: {', '.join(missing)}" if missing else ""
        line += f"; missing seeds: {', '.join(partial)}" if partial else ""
        lines.append(line)
    design = {unit.condition.name for units in PARTS.values() for unit in units}
    absent = sorted(design - set(benchmark.conditions))
    if absent:
        lines.append(f"- conditions without any record: {', '.join(absent)}")
    return lines + [""]


def preregistration_section(preregistration: Record | None, benchmark: Benchmark) -> list[str]:
    lines = ["## 2. Pre-registered hyperparameters", ""]
    if preregistration is None:
        used = sorted({json.dumps(record["hyperparameters"], sort_keys=True) for record in benchmark.records})
        return lines + [f"none (quick smoke run): no preregistration.json; the runs used {_list(used)}.", ""]
    return lines + [
        f"- chosen: `{json.dumps(preregistration.get('chosen'), sort_keys=True)}`",
        f"- criterion: {preregistration.get('criterion', 'not recorded')}",
        f"- written at: {preregistration.get('written_at', 'not recorded')} (commit "
        f"{preregistration.get('commit') or 'not recorded'})",
        "",
    ]


def headline_section(analysis: Analysis) -> list[str]:
    lines = ["## 3. Headline (h = 1)", ""]
    if analysis.headline is None:
        return lines + ["Not run yet: no record of the headline condition.", ""]
    header = ["method", "scored model", "seeds", "AUROC (mean over sites)", "worst-site AUROC"]
    header += [metric.title for metric in SUMMARY_METRICS[1:]] + ["uplink bytes / client / round", "shared params"]
    body = []
    for row in analysis.headline_rows:
        metrics = row.metrics
        body.append(
            [row.method, row.kind, str(metrics["auroc"].n_seeds), _effect_text(metrics["auroc"])]
            + [_effect_text(metrics["worst_auroc"])]
            + [_effect_text(metrics[metric.name]) for metric in SUMMARY_METRICS[1:]]
            + [
                _bytes_text(row.bytes_per_round),
                "n/a (not federated)" if row.shared_params is None else f"{row.shared_params:,}",
            ]
        )
    missing = [method for method in METHODS if method not in {row.method for row in analysis.headline_rows}]
    return (
        lines
        + _table(header, body)
        + [
            "",
            "Scored model: personalised where the method has one, else global (central for centralized). Each "
            "figure is the mean over sites of the per-site seed-mean metric, its 95 % interval a hierarchical "
            "bootstrap (seeds resampled jointly for all sites, each site's test subjects within class; "
            "`over_sites`); worst-site AUROC: the minimum over sites, from the same replicates (as "
            "stats.worst_site_interval). Balanced accuracy, sensitivity and "
            "specificity: decision P > the run's validation threshold, each seed's scores binarised at its own "
            "threshold. ECE's resampled values are biased upward (an absolute value per bin), so its percentile "
            "interval can lie above the estimate. Uplink bytes: mean over seeds of the serialized payload a site "
            "sent per round.",
            "",
            f"Not run yet at the headline: {', '.join(missing)}." if missing else "Every method has headline records.",
            "",
        ]
    )


def site_auroc_section(analysis: Analysis) -> list[str]:
    lines = ["## 4. Per-site AUROC (headline)", ""]
    if not analysis.headline_rows:
        return lines + ["Not run yet.", ""]
    sites = list(dict.fromkeys(site for row in analysis.headline_rows for site in row.site_auroc))
    body = [
        [row.method, *(_with_half_width(row.site_auroc.get(site)) for site in sites)] for row in analysis.headline_rows
    ]
    widths = [
        ((effect.high - effect.low) / 2, row.method, site)
        for row in analysis.headline_rows
        for site, effect in row.site_auroc.items()
    ]
    largest, method, site = max(widths)
    verdict = "met" if largest <= HALF_WIDTH_TARGET else "NOT met"
    return (
        lines
        + _table(["method", *sites], body)
        + [
            "",
            "Primary model's seed-mean AUROC [95 % hierarchical-bootstrap interval] ± half-width.",
            f"Largest half-width: {largest:.3f} ({method} at {site}); the target ≤ {HALF_WIDTH_TARGET} is {verdict}.",
            "",
        ]
    )


def effects_section(analysis: Analysis) -> list[str]:
    lines = ["## 5. Primary effects (headline)", ""]
    if not analysis.effects:
        return lines + ["Not run yet: no pair of headline records to compare.", ""]
    header = ["comparison", "site", "ΔAUROC [95 % CI]", "seeds", "p (bootstrap)", "p (Holm)", "verdict"]
    header.append("Wilcoxon p (all seed × site pairs; secondary)")
    body = [
        [
            item.comparison.label,
            item.site,
            _effect_text(item.effect, signed=True),
            str(item.effect.n_seeds),
            _p_text(item.effect.p_value),
            _p_text(item.effect.p_holm),
            _significance(item.effect),
            _wilcoxon_text(analysis.wilcoxon[item.comparison.label]),
        ]
        for item in analysis.effects
    ]
    family = len([item for item in analysis.effects if math.isfinite(item.effect.p_value)])
    return (
        lines
        + _table(header, body)
        + [
            "",
            "ΔAUROC: seed-mean AUROC of the first model minus the second, paired by seed and test subject, with its "
            "hierarchical-bootstrap 95 % interval and two-sided bootstrap p (stats.paired_delta's, computed by "
            f"`paired_deltas`, which shares each model's replicates). Holm family: all {family} rows of this table "
            "(med_duallora's personalised model against every other method's primary model, and every method's "
            "personalised model against its own global-only model, at every site). "
            f"{analysis.effects[0].effect.n_boot} replicates, so that the smallest bootstrap p, 2 / (B + 1), "
            f"times {family} is at most {ALPHA / 2:g}. Verdict: p (Holm) < {ALPHA:g}. Wilcoxon "
            "(experiments.significance.paired_wilcoxon) on the per-run AUROC differences over all seed × site "
            "pairs of the comparison, unadjusted: a secondary check only.",
            "",
        ]
        + [f"- Wilcoxon, {label}: {test.note}" for label, test in analysis.wilcoxon.items() if test.note]
        + [""]
    )


def gap_section(analysis: Analysis) -> list[str]:
    lines = ["## 6. Gap closure (headline)", ""]
    if not analysis.gaps:
        return lines + ["Not computed: no headline method with both a personalised and a global model yet.", ""]
    sites = list(dict.fromkeys(site for per_site in analysis.gaps.values() for site in per_site))
    body = [[method, *(_gap_text(per_site.get(site)) for site in sites)] for method, per_site in analysis.gaps.items()]
    return (
        lines
        + _table(["method", *sites], body)
        + [
            "",
            "(personalised − global) / (reference − global) of seed-mean AUROCs, the reference being the global "
            "model on the Siemens-profile renderings of the same test hearts (stats.gap_closure), 95 % interval. "
            f"Undefined where |reference − global| < {stats.MIN_GAP}.",
            "",
        ]
    )


def sweep_section(analysis: Analysis) -> list[str]:
    hs = sorted(set(SWEEP_HETEROGENEITY) | {h for per_h in analysis.sweep.values() for h in per_h})
    body = [[f"{h:g}", *(_effect_text(per_h.get(h), signed=True) for per_h in analysis.sweep.values())] for h in hs]
    return (
        ["## 7. Sweep over heterogeneity h", ""]
        + _table(["h", *(f"Δ {label}" for label in analysis.sweep)], body)
        + [
            "",
            "ΔAUROC mean over sites of the per-site paired differences, 95 % hierarchical-bootstrap interval (seeds "
            "jointly, each site's subjects independently; `over_sites`). h = 1 is the headline's runs.",
            "",
        ]
    )


def sanity_section(benchmark: Benchmark, sanity: Record | None) -> list[str]:
    lines = [
        "## 8. Sanity checks",
        "",
        "Majority-class baseline: AUROC 0.5, balanced accuracy 0.5, accuracy max(p, 1 − p).",
        "",
    ]
    body = []
    for condition in benchmark.conditions:
        for site in benchmark.sites(condition):
            test = benchmark.subjects[(condition, site)][1]
            val = _validation_labels(benchmark, condition, site)
            body.append([condition, site, str(test.size), *_prevalence_cells([test])])
            body[-1] += (
                [_list(sorted({labels.size for labels in val})), *_prevalence_cells(val)] if val else ["n/a"] * 3
            )
    if body:
        header = [
            "condition",
            "site",
            "n test",
            "test prevalence",
            "test majority accuracy",
            "n val",
            "val prevalence",
        ]
        lines += _table(header + ["val majority accuracy"], body)
        lines += ["", "Prevalence: share diseased; validation sets differ by seed (mean over seeds).", ""]
    else:
        lines += ["No records yet.", ""]
    return lines + _sanity_file_lines(sanity)


def _validation_labels(benchmark: Benchmark, condition: str, site: str) -> list[np.ndarray]:
    """One validation label vector per seed (the seed's validation set is every method's)."""
    by_seed = {}
    for record in benchmark.records:
        entry = record["sites"].get(site, {})
        if record["condition"]["name"] == condition and "val_labels" in entry:
            by_seed.setdefault(int(record["seed"]), np.asarray(entry["val_labels"], dtype=np.int64))
    return [labels for labels in by_seed.values() if labels.size]


def _prevalence_cells(label_sets: Sequence[np.ndarray]) -> list[str]:
    prevalence = float(np.mean([labels.mean() for labels in label_sets]))
    return [f"{prevalence:.3f}", f"{max(prevalence, 1 - prevalence):.3f}"]


def _sanity_file_lines(sanity: Record | None) -> list[str]:
    """sanity.json's probe AUROC per vendor (own and Siemens-profile renderings) and vendor-ID accuracy by h."""
    sanity = sanity or {}
    probe, siemens = sanity.get("probe_auroc_by_vendor"), sanity.get("probe_auroc_by_vendor_siemens_rendering", {})
    lines = ["Frozen-feature probe AUROC by vendor (healthy vs diseased, the site's test set):", ""]
    if probe:
        body = [
            [
                site,
                _number_text(entry.get("auroc")),
                str(entry.get("n")),
                _number_text(siemens.get(site, {}).get("auroc")),
            ]
            for site, entry in probe.items()
        ]
        lines += _table(["site", "probe AUROC", "n", "probe AUROC, Siemens-profile rendering"], body)
    else:
        lines.append(f"not measured (no `probe_auroc_by_vendor` in {SANITY_FILE})")
    lines += ["", "Vendor identification accuracy from the images, by h (chance 0.25 with four balanced vendors):", ""]
    vendor = sanity.get("vendor_id_accuracy")
    if vendor:
        lines += _table(["h", "accuracy"], [[h, _number_text(accuracy)] for h, accuracy in vendor.items()])
    else:
        lines.append(f"not measured (no `vendor_id_accuracy` in {SANITY_FILE})")
    return lines + [""]


def _number_text(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a" if value is None else str(value)


def verdicts_section(analysis: Analysis) -> list[str]:
    """Every comparison's verdict, mechanically; what it says is left to the authors."""
    lines = ["## 9. Verdicts (mechanical; the interpretation is left to the authors)", ""]
    lines += [f"- {name} control: {verdict.status}" for name, verdict in analysis.verdicts.items()]
    for item in analysis.effects:
        effect = item.effect
        lines.append(
            f"- {item.comparison.label} at {item.site}: {_effect_text(effect, signed=True)}, p_Holm "
            f"{_p_text(effect.p_holm)}: {_significance(effect)}"
        )
    for label, per_h in analysis.sweep.items():
        for h, effect in sorted(per_h.items()):
            excludes = not effect.low <= 0 <= effect.high
            lines.append(
                f"- sweep h = {h:g}, {label}, mean over sites: {_effect_text(effect, signed=True)}, p (unadjusted) "
                f"{_p_text(effect.p_value)}: interval {'excludes' if excludes else 'contains'} 0"
            )
    return lines + [""]


def methods_section(benchmark: Benchmark) -> list[str]:
    present = {record["method"] for record in benchmark.records}
    return (
        ["## Methods", ""]
        + [
            f"- `{name}`: {spec.description}" + ("" if name in present else " (no records yet)")
            for name, spec in METHODS.items()
        ]
        + [""]
    )


def _effect_text(effect: stats.Effect | None, signed: bool = False) -> str:
    if effect is None:
        return "not run"
    if not math.isfinite(effect.estimate):
        return "undefined"
    form = "{:+.3f}" if signed else "{:.3f}"
    if not (math.isfinite(effect.low) and math.isfinite(effect.high)):
        return f"{form.format(effect.estimate)} [interval undefined]"
    return f"{form.format(effect.estimate)} [{form.format(effect.low)}, {form.format(effect.high)}]"


def _with_half_width(effect: stats.Effect | None) -> str:
    return "not run" if effect is None else f"{_effect_text(effect)} ±{(effect.high - effect.low) / 2:.3f}"


def _gap_text(effect: stats.Effect | None) -> str:
    if effect is None:
        return "no Siemens-rendering scores"
    if not math.isfinite(effect.estimate):
        return "undefined"
    return _effect_text(effect, signed=True)


def _bytes_text(value: float | None) -> str:
    if value is None:
        return "none (not federated)"
    return "0 (nothing sent)" if value == 0 else f"{value:,.0f}"


def _p_text(p_value: float) -> str:
    if not math.isfinite(p_value):
        return "n/a"
    return "<0.001" if p_value < 0.001 else f"{p_value:.3g}"


def _significance(effect: stats.Effect) -> str:
    if not math.isfinite(effect.p_holm):
        return "not tested"
    return "significant" if effect.p_holm < ALPHA else "not significant"


def _wilcoxon_text(test: PairedTest) -> str:
    return f"{_p_text(test.p_value)} ({test.n_pairs} pairs)"


def _list(values: Iterable[Any]) -> str:
    return " ".join(str(value) for value in values) or "none"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


# ---- plots and the entry point ----


def validation_curves(benchmark: Benchmark, condition: str) -> dict[str, dict[int, float]]:
    """Per method, per round: the validation AUROC averaged over sites within each run, then over the runs."""
    curves: dict[str, dict[int, float]] = {}
    for method in benchmark.methods(condition):
        per_round: dict[int, list[float]] = {}
        for record in benchmark.runs(condition, method):
            by_round: dict[int, list[float]] = {}
            for entry in record.get("rounds", []):
                if entry.get("auroc") is not None and math.isfinite(entry["auroc"]):
                    by_round.setdefault(int(entry["round"]), []).append(float(entry["auroc"]))
            for index, values in by_round.items():
                per_round.setdefault(index, []).append(float(np.mean(values)))
        if per_round:
            curves[method] = {index: float(np.mean(values)) for index, values in sorted(per_round.items())}
    return curves


def reliability_bins(labels: ArrayLike, scores: ArrayLike, n_bins: int = stats.ECE_BINS) -> plots.ReliabilityBins:
    """Equal-width bins as in stats.expected_calibration_error (the last one closed); empty bins left out."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    bins = np.minimum((scores * n_bins).astype(np.int64), n_bins - 1)
    kept = [k for k in range(n_bins) if np.any(bins == k)]
    return plots.ReliabilityBins(
        mean_score=[float(scores[bins == k].mean()) for k in kept],
        share_diseased=[float(labels[bins == k].mean()) for k in kept],
        count=[int(np.sum(bins == k)) for k in kept],
    )


def reliability_diagrams(benchmark: Benchmark, condition: str) -> dict[str, dict[str, plots.ReliabilityBins]]:
    """Per site, each main method's primary model, its seeds' test scores pooled."""
    diagrams: dict[str, dict[str, plots.ReliabilityBins]] = {}
    for site in benchmark.sites(condition):
        for method in RELIABILITY_METHODS:
            scored = benchmark.scored(condition, (method, benchmark.primary_kind(condition, method)), site)
            if scored:
                seeds = sorted(scored.seeds())
                labels = np.tile(scored.labels, len(seeds))
                diagrams.setdefault(site, {})[method] = reliability_bins(labels, scored.matrix("test", seeds).ravel())
    return diagrams


def write_plots(benchmark: Benchmark, analysis: Analysis, out_dir: Path) -> list[Path]:
    """The five PNGs; a plot without data says so on its canvas."""
    headline = analysis.headline
    panels = {"Primary effects (h = 1)": [(f"{e.comparison.label} @ {e.site}", e.effect) for e in analysis.effects]}
    for role, effects in analysis.controls.items():
        panels[role.capitalize()] = [
            (f"{label} @ {site}", effect) for label, per_site in effects.items() for site, effect in per_site.items()
        ]
    points = [plots.CostPoint(row.method, row.bytes_per_round, row.metrics["auroc"]) for row in analysis.headline_rows]
    return [
        plots.delta_against_h(
            out_dir / PLOT_FILES["sweep"], {label: sorted(per_h.items()) for label, per_h in analysis.sweep.items()}
        ),
        plots.forest(out_dir / PLOT_FILES["forest"], panels),
        plots.auroc_against_bytes(out_dir / PLOT_FILES["bytes"], points),
        plots.validation_curves(
            out_dir / PLOT_FILES["rounds"], validation_curves(benchmark, headline) if headline else {}
        ),
        plots.reliability(
            out_dir / PLOT_FILES["reliability"], reliability_diagrams(benchmark, headline) if headline else {}
        ),
    ]


def read_sanity(results_dir: Path) -> Record | None:
    path = Path(results_dir) / SANITY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_report(
    results_dir: Path, log: Log = print, *, n_boot: int = stats.N_BOOT, row_n_boot: int = ROW_N_BOOT
) -> list[Path]:
    """results.csv, summary.md and the plots in `results_dir`, from its records (and its preregistration.json and
    sanity.json when present); works on partial results, saying what is missing. Returns the files written."""
    results_dir = Path(results_dir)
    records = read_records(results_dir)
    log(f"report: {len(records)} records")
    benchmark = Benchmark.of(records)
    analysis = analyse(benchmark, n_boot)
    csv_path, summary_path = results_dir / "results.csv", results_dir / "summary.md"
    write_text_atomic(csv_path, results_csv(result_rows(records, row_n_boot)))
    summary = summary_markdown(benchmark, analysis, read_preregistration(results_dir), read_sanity(results_dir))
    write_text_atomic(summary_path, summary)
    paths = [csv_path, summary_path, *write_plots(benchmark, analysis, results_dir)]
    statuses = ", ".join(f"{name} control {verdict.status}" for name, verdict in analysis.verdicts.items())
    log(f"report: {statuses}; wrote {', '.join(path.name for path in paths)}")
    return paths
