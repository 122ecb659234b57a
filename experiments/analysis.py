"""The benchmark's numbers from its records: scores indexed by subject, results.csv rows, effects with intervals and
the controls' verdicts (experiments.report writes them out)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from data_prep.splits import REFERENCE_TEST_SPLIT
from experiments import stats
from experiments.design import SHIFTED_SITE
from experiments.runs import METHODS, VARIANTS
from experiments.significance import PairedTest, paired_wilcoxon
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
VARIANT_METRICS = ("auroc", "bal_acc")
"""What the transport and privacy table shows of each variant (besides ΔAUROC, bytes and time)."""
MIN_SPECIFICITY = 0.8
RELIABILITY_METHODS = ("med_duallora", "fedit", "local_only", "centralized")
PLOT_FILES = {
    "sweep": "delta_auroc_vs_h.png",
    "forest": "effects_forest.png",
    "bytes": "auroc_vs_bytes.png",
    "rounds": "val_auroc_per_round.png",
    "reliability": "reliability.png",
    "privacy": "privacy_auroc_vs_bytes.png",
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
        """The methods compared at `condition`: METHODS first, then any other but the variants (VARIANTS)."""
        present = {method for name, method, _, _ in self.models if name == condition} - set(VARIANTS)
        return [method for method in METHODS if method in present] + sorted(present - set(METHODS))

    def variants(self, condition: str) -> list[str]:
        """The transport and privacy variants (VARIANTS) with records at `condition`."""
        present = {method for name, method, _, _ in self.models if name == condition}
        return [method for method in VARIANTS if method in present]

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
            f"{effect_text(at_shift, signed=True)} "
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


def effect_text(effect: stats.Effect | None, signed: bool = False) -> str:
    """`0.812 [0.679, 0.924]` (signed: `+0.012 [...]`); `not run` for None, `undefined` for NaN."""
    if effect is None:
        return "not run"
    if not math.isfinite(effect.estimate):
        return "undefined"
    form = "{:+.3f}" if signed else "{:.3f}"
    if not (math.isfinite(effect.low) and math.isfinite(effect.high)):
        return f"{form.format(effect.estimate)} [interval undefined]"
    return f"{form.format(effect.estimate)} [{form.format(effect.low)}, {form.format(effect.high)}]"


def _per_site_text(per_site: Mapping[str, stats.Effect]) -> str:
    return "; ".join(f"{site} {effect_text(effect, signed=True)}" for site, effect in per_site.items())


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
class VariantRow:
    """A method or one of its transport and privacy variants at the headline, on the seeds the method and all its
    variants share: its primary model's AUROC and balanced accuracy (means over sites), ΔAUROC against the method
    (None for the method itself), uplink bytes per client per round, job wall time per round, and under DP-SGD
    the ε spent (mean over seeds of the largest site's; None without DP) at `delta`."""

    method: str
    base: str
    kind: str
    seeds: list[int]
    metrics: dict[str, stats.Effect]
    delta_auroc: stats.Effect | None
    bytes_per_round: float | None
    wall_s_per_round: float | None
    epsilon: float | None = None
    delta: float | None = None


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
    variants: list[VariantRow] = field(default_factory=list)


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
        variants=variant_rows(benchmark, headline, n_boot) if headline else [],
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
        runs = benchmark.runs(condition, method)
        costs = [record["cost"] for record in runs]
        shared = next((cost["params"]["shared"] for cost in costs if cost["params"].get("shared") is not None), None)
        bytes_per_round, _ = _round_costs(runs)
        rows.append(HeadlineRow(method, side[1], metrics, summaries["auroc"].sites, bytes_per_round, shared))
    return rows


def variant_rows(benchmark: Benchmark, condition: str, n_boot: int) -> list[VariantRow]:
    """Each base method with variants at `condition`, then its variants, all on their common seeds; ΔAUROC is the
    hierarchical-bootstrap paired difference variant - base, mean over sites (`over_sites`)."""
    rows = []
    variants = benchmark.variants(condition)
    for base in dict.fromkeys(VARIANTS[name].base for name in variants):
        methods = [base] + [name for name in variants if VARIANTS[name].base == base]
        sides = [(method, benchmark.primary_kind(condition, method)) for method in methods]
        if any(kind is None for _, kind in sides):
            continue
        scores = {source: across_sites(benchmark, condition, sides, source) for source in ("test", "decisions")}
        if not scores["test"]:
            continue
        seeds = common_seeds([benchmark.scored(condition, side, site) for side in sides for site in scores["test"]])
        for index, (method, kind) in enumerate(sides):
            metrics = {
                metric.name: over_sites(
                    {site: (labels, [matrices[index]]) for site, (labels, matrices) in scores[metric.source].items()},
                    metric.function,
                    n_boot,
                ).mean
                for metric in SUMMARY_METRICS
                if metric.name in VARIANT_METRICS
            }
            delta = None
            if index:
                paired = {site: (labels, [m[index], m[0]]) for site, (labels, m) in scores["test"].items()}
                delta = over_sites(paired, stats.auroc, n_boot).mean
            runs = [run for run in benchmark.runs(condition, method) if int(run["seed"]) in seeds]
            row = VariantRow(method, base, kind, seeds, metrics, delta, *_round_costs(runs), *_privacy_spent(runs))
            rows.append(row)
    return rows


def _privacy_spent(runs: Sequence[Record]) -> tuple[float | None, float | None]:
    """Mean over `runs` of the ε each run spent (its largest site's) and their δ; (None, None) without DP-SGD."""
    spent = [run["privacy"] for run in runs if run.get("privacy")]
    if not spent or len(spent) != len(runs):
        return None, None
    deltas = {entry["delta"] for entry in spent}
    if len(deltas) != 1:
        raise ValueError(f"runs of one method at different deltas {sorted(deltas)}")
    return float(np.mean([entry["epsilon"] for entry in spent])), deltas.pop()


def _round_costs(runs: Sequence[Record]) -> tuple[float | None, float | None]:
    """Mean uplink bytes per client per round, and mean job wall time per round (the job's start-up and final
    evaluation included, shared among its replicas), of `runs`."""
    sent = [run["cost"]["bytes_sent_per_client_round"] for run in runs]
    sent = [value for value in sent if value is not None]
    per_round = [
        run["cost"]["job_wall_s"] / (run["cost"]["seeds_in_job"] * run["hyperparameters"]["rounds"])
        for run in runs
        if run["cost"].get("job_wall_s") and run["cost"].get("seeds_in_job")
    ]
    return (float(np.mean(sent)) if sent else None, float(np.mean(per_round)) if per_round else None)


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
