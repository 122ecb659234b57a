"""The benchmark's report from its records: summary.md (the controls first), results.csv and the PNG plots, with the
numbers of experiments.analysis."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from experiments import plots, stats
from experiments.analysis import (
    ALPHA,
    HALF_WIDTH_TARGET,
    PLOT_FILES,
    RELIABILITY_METHODS,
    ROW_N_BOOT,
    SUMMARY_METRICS,
    Analysis,
    Benchmark,
    Log,
    Record,
    analyse,
    effect_text,
    result_rows,
    results_csv,
    validity_banner,
    validity_section,
)
from experiments.design import DEFAULT_SEEDS, PARTS, SWEEP_HETEROGENEITY
from experiments.preregistration import read_preregistration
from experiments.records import EXTENSION_FIELD, read_records
from experiments.runs import ALL_METHODS, METHODS
from experiments.sanity import SANITY_FILE
from experiments.significance import PairedTest
from models.atomic_io import write_text_atomic

# ---- summary.md ----


def summary_markdown(
    benchmark: Benchmark, analysis: Analysis, preregistration: Record | None, sanity: Record | None
) -> str:
    """summary.md: validity first, then coverage, pre-registration, headline, per-site AUROC, primary effects, gap
    closure, sweep, sanity checks, the mechanical verdicts, transport and privacy, the methods and the plots."""
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
    lines += privacy_section(analysis)
    lines += methods_section(benchmark)
    lines += ["## Plots", ""] + [f"- `{name}`" for name in PLOT_FILES.values()] + [""]
    return "\n".join(lines)


def coverage_section(benchmark: Benchmark) -> list[str]:
    """Which parts, conditions and methods have records, for every seed found, and which are missing."""
    seeds: dict[tuple[str, str], set[int]] = {}
    for record in benchmark.records:
        seeds.setdefault((record["condition"]["name"], record["method"]), set()).add(int(record["seed"]))
    all_seeds = set().union(*seeds.values())
    sizes = sorted({len(entry["test_ids"]) for record in benchmark.records for entry in record["sites"].values()})
    extended = sum(EXTENSION_FIELD in record for record in benchmark.records)
    lines = [
        "## Coverage",
        "",
        f"{len(benchmark.records)} records; seeds {_list(sorted(all_seeds))}; test subjects per site {_list(sizes)}"
        + (
            f"; {extended} records had their later test draws scored by their run's exported models "
            "(experiments.extend)."
            if extended
            else "."
        ),
        "",
    ]
    required = set(DEFAULT_SEEDS)
    for part, units in PARTS.items():
        keys = {unit.name: (unit.condition.name, unit.method) for unit in units}
        missing = [name for name, key in keys.items() if key not in seeds]
        partial = [
            f"{name} (seeds {_list(sorted(seeds[key]))})"
            for name, key in keys.items()
            if key in seeds and not required <= seeds[key]
        ]
        held = sorted({_list(sorted(seeds[key])) for key in keys.values() if key in seeds})
        line = f"- part `{part}`: {len(units) - len(missing) - len(partial)} of {len(units)} units complete"
        line += f" (seeds {'; '.join(held)})" if held else ""
        line += f"; not run: {', '.join(missing)}" if missing else ""
        line += f"; without every seed of {_list(DEFAULT_SEEDS)}: {', '.join(partial)}" if partial else ""
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
            [row.method, row.kind, str(metrics["auroc"].n_seeds), effect_text(metrics["auroc"])]
            + [effect_text(metrics["worst_auroc"])]
            + [effect_text(metrics[metric.name]) for metric in SUMMARY_METRICS[1:]]
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
            effect_text(item.effect, signed=True),
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
    body = [[f"{h:g}", *(effect_text(per_h.get(h), signed=True) for per_h in analysis.sweep.values())] for h in hs]
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
            f"- {item.comparison.label} at {item.site}: {effect_text(effect, signed=True)}, p_Holm "
            f"{_p_text(effect.p_holm)}: {_significance(effect)}"
        )
    for label, per_h in analysis.sweep.items():
        for h, effect in sorted(per_h.items()):
            excludes = not effect.low <= 0 <= effect.high
            lines.append(
                f"- sweep h = {h:g}, {label}, mean over sites: {effect_text(effect, signed=True)}, p (unadjusted) "
                f"{_p_text(effect.p_value)}: interval {'excludes' if excludes else 'contains'} 0"
            )
    return lines + [""]


def privacy_section(analysis: Analysis) -> list[str]:
    lines = ["## 10. Transport and privacy (h = 1)", ""]
    if not analysis.variants:
        return lines + ["Not run yet: no record of a variant (`--part privacy`).", ""]
    header = ["method", "seeds", "AUROC (mean over sites)", "balanced accuracy", "ΔAUROC vs its base"]
    header += ["uplink bytes / client / round", "job wall s / round", "ε (DP-SGD)"]
    body = [
        [
            row.method,
            _list(row.seeds),
            effect_text(row.metrics["auroc"]),
            effect_text(row.metrics["bal_acc"]),
            f"base ({row.base})" if row.delta_auroc is None else effect_text(row.delta_auroc, signed=True),
            _bytes_text(row.bytes_per_round),
            "n/a" if row.wall_s_per_round is None else f"{row.wall_s_per_round:.1f}",
            "— (no DP)" if row.epsilon is None else f"{row.epsilon:.2f} at δ = {row.delta:g}",
        ]
        for row in analysis.variants
    ]
    note = (
        "Every row of a base method and its variants is on the seeds they all share. ΔAUROC: variant - base, mean "
        "over sites of the paired per-site difference, hierarchical-bootstrap 95 % interval (as the headline's). "
        "Uplink bytes: the serialized payload a site sent per round, as the server's meter counted it (packed, "
        "for a codec, encrypted under secure aggregation). Job wall s / round: the job's wall time over its rounds "
        "and replicas (in the simulator; on a POC network for secure aggregation, from submission), start-up and "
        "final evaluation included, on a shared 2-core machine (a rough figure; bench/compression.py and "
        "bench/secure_aggregation.py time the codec and the encryption themselves). ε: the budget spent, mean "
        "over seeds of the largest site's; each patient is at one site, so that is the run's guarantee for any "
        "one patient, under the assumptions of docs/privacy.md (no row without DP-SGD carries any)."
    )
    return lines + _table(header, body) + ["", note, ""]


def methods_section(benchmark: Benchmark) -> list[str]:
    present = {record["method"] for record in benchmark.records}
    return (
        ["## Methods", ""]
        + [
            f"- `{name}`: {spec.description}" + ("" if name in present else " (no records yet)")
            for name, spec in ALL_METHODS.items()
        ]
        + [""]
    )


def _with_half_width(effect: stats.Effect | None) -> str:
    return "not run" if effect is None else f"{effect_text(effect)} ±{(effect.high - effect.low) / 2:.3f}"


def _gap_text(effect: stats.Effect | None) -> str:
    if effect is None:
        return "no Siemens-rendering scores"
    if not math.isfinite(effect.estimate):
        return "undefined"
    return effect_text(effect, signed=True)


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
    """The six PNGs; a plot without data says so on its canvas."""
    headline = analysis.headline
    panels = {"Primary effects (h = 1)": [(f"{e.comparison.label} @ {e.site}", e.effect) for e in analysis.effects]}
    for role, effects in analysis.controls.items():
        panels[role.capitalize()] = [
            (f"{label} @ {site}", effect) for label, per_site in effects.items() for site, effect in per_site.items()
        ]
    points = [plots.CostPoint(row.method, row.bytes_per_round, row.metrics["auroc"]) for row in analysis.headline_rows]
    variant_points = [
        plots.CostPoint(
            row.method if row.epsilon is None else f"{row.method} (ε {row.epsilon:.1f})",
            row.bytes_per_round,
            row.metrics["auroc"],
        )
        for row in analysis.variants
    ]
    return [
        plots.delta_against_h(
            out_dir / PLOT_FILES["sweep"], {label: sorted(per_h.items()) for label, per_h in analysis.sweep.items()}
        ),
        plots.forest(out_dir / PLOT_FILES["forest"], panels),
        plots.auroc_against_bytes(out_dir / PLOT_FILES["bytes"], points),
        plots.auroc_against_bytes(
            out_dir / PLOT_FILES["privacy"],
            variant_points,
            "AUROC against communication: transport and privacy (h = 1)",
        ),
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
