"""Benchmark outputs from finished run records: results.csv, summary.md and the PNG plots."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.significance import PairedTest, compare_to_baselines  # noqa: E402
from models.atomic_io import write_atomic, write_text_atomic  # noqa: E402
from models.metrics import (  # noqa: E402
    DEFAULT_THRESHOLD,  # noqa: E402
    METRIC_NAMES,
    binary_metrics,
    mean_over_sites,
    mean_std,
)

REFERENCE_METHOD = "med_duallora"
POOLED_SITE = "pooled"
MODEL_KIND_ORDER = ("personalised", "global", "central")
COST_COLUMNS = (
    "bytes_sent_total",
    "bytes_sent_per_client_round",
    "full_model_bytes",
    "trainable_params",
    "shared_params",
    "rounds",
    "wall_s",
)
RESULT_COLUMNS = (
    "method",
    "seed",
    "site",
    "model_kind",
    "n_test",
    *METRIC_NAMES,
    "tn",
    "fp",
    "fn",
    "tp",
    *COST_COLUMNS,
)
PLOT_FILES = {"rounds": "bal_acc_per_round.png", "bytes": "bal_acc_vs_bytes.png", "sites": "bal_acc_per_site.png"}

RunRecord = Mapping[str, Any]
"""One finished (method, seed) run; the schema is documented in docs/evaluation.md ("Run record")."""


def primary_kind(kinds: Iterable[str]) -> str:
    """The model a method is compared on: personalised where it has one, else global, else central."""
    available = set(kinds)
    for kind in MODEL_KIND_ORDER:
        if kind in available:
            return kind
    raise ValueError(f"no known model kind among {sorted(available)}; expected one of {MODEL_KIND_ORDER}")


def result_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per method x seed x site x model kind, plus a `pooled` row per method x seed x model kind."""
    rows = []
    for record in records:
        costs = _cost_columns(record)
        by_kind: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for evaluation in record["evaluations"]:
            by_kind[evaluation["model_kind"]].append(evaluation)
        for kind, evaluations in by_kind.items():
            scored = {evaluation["site"]: _site_metrics(evaluation) for evaluation in evaluations}
            if all("labels" in evaluation for evaluation in evaluations):
                labels = [label for evaluation in evaluations for label in evaluation["labels"]]
                scores = [score for evaluation in evaluations for score in evaluation["scores"]]
                thresholds = [_threshold(evaluation) for evaluation in evaluations for _ in evaluation["scores"]]
                scored[POOLED_SITE] = binary_metrics(labels, scores, thresholds)
            for site, metrics in scored.items():
                row = {"method": record["method"], "seed": record["seed"], "site": site, "model_kind": kind}
                row |= {"n_test": metrics["n"]} | {name: metrics[name] for name in RESULT_COLUMNS if name in metrics}
                rows.append(row | costs)
    return rows


def _site_metrics(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics of one site's test split: from its per-subject scores, else as the client reported them (no pooling)."""
    if "labels" in evaluation:
        return binary_metrics(evaluation["labels"], evaluation["scores"], _threshold(evaluation))
    return {name: float(evaluation["metrics"][name]) for name in METRIC_NAMES} | {"n": int(evaluation["n"])}


def _threshold(evaluation: Mapping[str, Any]) -> float:
    """The decision threshold the site chose for this model on validation data (0.5 in records made before)."""
    return float(evaluation.get("threshold", DEFAULT_THRESHOLD))


def _cost_columns(record: RunRecord) -> dict[str, Any]:
    communication = record.get("communication", {})
    params = record.get("params", {})
    return {
        "bytes_sent_total": communication.get("bytes_sent_total"),
        "bytes_sent_per_client_round": communication.get("bytes_sent_per_client_round"),
        "full_model_bytes": communication.get("full_model_bytes"),
        "trainable_params": params.get("trainable"),
        "shared_params": params.get("shared"),
        "rounds": record.get("rounds_completed"),
        "wall_s": record.get("wall_s"),
    }


def write_results_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """results.csv with the columns of RESULT_COLUMNS, floats at full precision, missing values empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _csv_value(row.get(column)) for column in RESULT_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def _kinds_by_method(rows: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """The model kinds each method reported, methods in first-seen order."""
    kinds: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        kinds[row["method"]].add(row["model_kind"])
    return dict(kinds)


def _primary_kinds(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The model kind each method is compared on, methods in first-seen order."""
    return {method: primary_kind(kinds) for method, kinds in _kinds_by_method(rows).items()}


def site_scores(rows: Sequence[Mapping[str, Any]], metric: str = "bal_acc") -> dict[str, dict[tuple[int, str], float]]:
    """Per method, its primary model's `metric` keyed by (seed, site), pooled rows left out: the pairs to test."""
    primary = _primary_kinds(rows)
    scores: dict[str, dict[tuple[int, str], float]] = defaultdict(dict)
    for row in rows:
        if row["site"] != POOLED_SITE and row["model_kind"] == primary[row["method"]]:
            scores[row["method"]][(int(row["seed"]), row["site"])] = float(row[metric])
    return dict(scores)


def significance(rows: Sequence[Mapping[str, Any]], reference: str = REFERENCE_METHOD) -> list[PairedTest]:
    """Balanced accuracy of `reference` against every other method, paired over seeds x sites."""
    scores = site_scores(rows)
    if reference not in scores:
        return []
    return compare_to_baselines(reference, scores, [method for method in scores if method != reference])


def _mean_std_text(values: Sequence[float], digits: int = 3) -> str:
    mean, std, count = mean_std(values)
    if count == 0:
        return "n/a"
    return f"{mean:.{digits}f}" if count == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _per_seed_site_means(rows: Sequence[Mapping[str, Any]], method: str, kind: str) -> dict[int, dict[str, float]]:
    """Unweighted mean over sites of every metric, for each seed of one method and model kind."""
    per_seed: dict[int, dict[str, Mapping[str, float]]] = defaultdict(dict)
    for row in rows:
        if row["method"] == method and row["model_kind"] == kind and row["site"] != POOLED_SITE:
            per_seed[int(row["seed"])][row["site"]] = row
    return {seed: mean_over_sites(sites) for seed, sites in sorted(per_seed.items())}


def _pooled(rows: Sequence[Mapping[str, Any]], method: str, kind: str, metric: str) -> list[float]:
    return [
        float(row[metric])
        for row in rows
        if row["method"] == method and row["model_kind"] == kind and row["site"] == POOLED_SITE
    ]


def _first_per_run(rows: Sequence[Mapping[str, Any]], method: str, column: str) -> list[float]:
    values = {int(row["seed"]): row[column] for row in rows if row["method"] == method}
    return [float(value) for value in values.values() if value is not None]


def _p_text(p_value: float) -> str:
    if math.isnan(p_value):
        return "n/a"
    return f"{p_value:.2g}" if p_value >= 0.001 else "<0.001"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def summary_markdown(
    rows: Sequence[Mapping[str, Any]],
    records: Sequence[RunRecord],
    method_notes: Mapping[str, str],
    header_lines: Sequence[str],
) -> str:
    """summary.md: performance, per-site, global-only, cost and significance tables, with their reading notes."""
    kinds = _kinds_by_method(rows)
    methods = list(kinds)
    primary = _primary_kinds(rows)
    tests = {test.baseline: test for test in significance(rows)}
    seeds = sorted({int(row["seed"]) for row in rows})
    lines = list(header_lines) + [""]

    lines += ["## Performance (mean ± std over seeds of the unweighted mean over sites)", ""]
    body = []
    for method in methods:
        seed_means = _per_seed_site_means(rows, method, primary[method])
        cells = [_mean_std_text([means[name] for means in seed_means.values()]) for name in METRIC_NAMES]
        pooled = _mean_std_text(_pooled(rows, method, primary[method], "bal_acc"))
        test = tests.get(method)
        p_cell = "reference" if method == REFERENCE_METHOD else (_p_text(test.p_holm) if test else "n/a")
        body.append([method, primary[method], *cells, pooled, p_cell])
    lines += _table(["method", "scored model", *METRIC_NAMES, "pooled bal_acc", "p vs med_duallora (Holm)"], body)
    lines += [
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Scored model: personalised where the method has one, else "
        "global, else central (docs/evaluation.md). Pooled = all test subjects of all sites as one test set.",
        "",
    ]

    lines += _per_site_section(rows, methods, primary)
    lines += _global_only_section(rows, records, methods, kinds)
    lines += _cost_section(rows, methods)
    lines += _significance_section(list(tests.values()))
    if method_notes:
        lines += ["## Methods", ""] + [f"- `{method}`: {note}" for method, note in method_notes.items()] + [""]
    return "\n".join(lines)


def _per_site_section(rows, methods, primary) -> list[str]:
    sites = list(dict.fromkeys(row["site"] for row in rows if row["site"] != POOLED_SITE))
    body = []
    for method in methods:
        cells = []
        for site in sites:
            values = [
                float(row["bal_acc"])
                for row in rows
                if row["method"] == method and row["site"] == site and row["model_kind"] == primary[method]
            ]
            cells.append(_mean_std_text(values))
        body.append([method, *cells])
    return (
        ["## Balanced accuracy per site (scored model, mean ± std over seeds)", ""]
        + _table(["method", *sites], body)
        + [""]
    )


def _global_only_section(rows, records, methods, kinds) -> list[str]:
    body = []
    for method in methods:
        if "personalised" not in kinds[method]:
            continue
        personalised = _per_seed_site_means(rows, method, "personalised")
        if "global" in kinds[method]:
            global_means = _per_seed_site_means(rows, method, "global")
            global_cell = _mean_std_text([means["bal_acc"] for means in global_means.values()])
        else:
            reasons = {r["not_evaluable"].get("global") for r in records if r["method"] == method}
            reasons.discard(None)
            global_cell = "not evaluable: " + "; ".join(sorted(reasons)) if reasons else "no global model"
        body.append([method, _mean_std_text([means["bal_acc"] for means in personalised.values()]), global_cell])
    if not body:
        return []
    return (
        ["## Personalised vs global-only (balanced accuracy, mean over sites)", ""]
        + _table(["method", "personalised", "global-only"], body)
        + [""]
    )


def _cost_section(rows, methods) -> list[str]:
    body = []
    for method in methods:
        body.append(
            [
                method,
                _integer_text(_first_per_run(rows, method, "trainable_params")),
                _integer_text(_first_per_run(rows, method, "shared_params")),
                _integer_text(_first_per_run(rows, method, "bytes_sent_per_client_round")),
                _integer_text(_first_per_run(rows, method, "bytes_sent_total")),
                _mean_std_text(_first_per_run(rows, method, "wall_s"), digits=0),
            ]
        )
    header = [
        "method",
        "trainable params",
        "shared params",
        "bytes sent / client / round",
        "bytes sent, run total",
        "wall time (s)",
    ]
    note = (
        "Bytes are the serialized payloads the clients sent, measured on the wire by the server (uploads only); "
        "params are per site."
    )
    return ["## Cost", ""] + _table(header, body) + ["", note, ""]


def _integer_text(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return f"{mean:,.0f}"


def _significance_section(tests: Sequence[PairedTest]) -> list[str]:
    if not tests:
        return ["## Significance", "", f"Not computed: `{REFERENCE_METHOD}` is not among the methods.", ""]
    body = [
        [
            test.baseline,
            str(test.n_pairs),
            str(test.n_zero),
            f"{test.mean_difference:+.3f}",
            f"{test.median_difference:+.3f}",
            "n/a" if math.isnan(test.statistic) else f"{test.statistic:g}",
            _p_text(test.p_value),
            _p_text(test.p_holm),
            test.test_method,
            test.note or "",
        ]
        for test in tests
    ]
    header = ["baseline", "pairs", "zero", "mean Δ", "median Δ", "W", "p", "p (Holm)", "test", "note"]
    note = (
        f"Two-sided Wilcoxon signed-rank test of `{REFERENCE_METHOD}` against each method on balanced accuracy, "
        "paired over seed × site (scored models; Δ = med_duallora − baseline). Holm adjustment across the rows."
    )
    return ["## Significance", "", note, ""] + _table(header, body) + [""]


def plot_all(rows: Sequence[Mapping[str, Any]], records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Write the three PNGs into out_dir; returns their paths."""
    paths = []
    for key, draw in (("rounds", _draw_rounds), ("bytes", _draw_bytes), ("sites", _draw_sites)):
        figure, axes = plt.subplots(figsize=(9.5, 4.5))
        axes.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # one colour per method, up to 20
        draw(axes, rows, records)
        figure.tight_layout()
        paths.append(_save_figure(figure, out_dir / PLOT_FILES[key]))
    return paths


def _save_figure(figure: plt.Figure, path: Path) -> Path:
    try:
        write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=120))
    finally:
        plt.close(figure)
    return path


def _draw_rounds(axes, rows, records) -> None:
    per_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        per_round: dict[int, list[float]] = defaultdict(list)
        for entry in record.get("rounds", []):
            if math.isfinite(entry["bal_acc"]):
                per_round[int(entry["round"])].append(entry["bal_acc"])
        for round_index, values in per_round.items():
            per_method[record["method"]][round_index].append(sum(values) / len(values))
    for method, rounds in per_method.items():
        xs = sorted(rounds)
        axes.plot(xs, [mean_std(rounds[x])[0] for x in xs], marker="o", label=method)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round (0 = the initial model; each site validates what it received, before training)")
    axes.set_ylabel("validation balanced accuracy\n(mean over sites and seeds)")
    axes.set_title("Balanced accuracy per round (personalised where the method has it)")
    _legend(axes)


def _draw_bytes(axes, rows, records) -> None:
    plotted = []
    for method, kind in _primary_kinds(rows).items():
        seed_means = _per_seed_site_means(rows, method, kind)
        mean, std, _ = mean_std([means["bal_acc"] for means in seed_means.values()])
        sent = _first_per_run(rows, method, "bytes_sent_total")
        if not sent:
            axes.axhline(mean, linestyle="--", color="grey", linewidth=1, label=f"{method} (no federation)")
            continue
        plotted.append(sum(sent) / len(sent))
        axes.errorbar([plotted[-1]], [mean], yerr=[0 if math.isnan(std) else std], fmt="o", capsize=3, label=method)
    _bytes_axis(axes, plotted)
    axes.set_ylabel("balanced accuracy (mean over sites)")
    axes.set_title("Balanced accuracy against communication")
    _legend(axes)


def _bytes_axis(axes, plotted: Sequence[float]) -> None:
    """Log x axis over the plotted byte counts (symlog from 0 when a method sent nothing), half a decade of margin."""
    positive = [value for value in plotted if value > 0]
    if not positive:
        axes.set_xlabel("bytes sent by all clients over the run")
        return
    right = max(positive) * 3
    if len(positive) == len(plotted):
        axes.set_xscale("log")
        axes.set_xlim(min(positive) / 3, right)
        axes.set_xlabel("bytes sent by all clients over the run (log scale)")
    else:
        axes.set_xscale("symlog", linthresh=min(positive) / 3)
        axes.set_xlim(0, right)
        axes.set_xlabel("bytes sent by all clients over the run (symlog scale: linear below the smallest)")


def _draw_sites(axes, rows, records) -> None:
    primary = _primary_kinds(rows)
    methods = list(primary)
    sites = list(dict.fromkeys(row["site"] for row in rows if row["site"] != POOLED_SITE))
    width = 0.8 / max(len(methods), 1)
    for index, method in enumerate(methods):
        means, stds = [], []
        for site in sites:
            values = [
                float(row["bal_acc"])
                for row in rows
                if row["method"] == method and row["site"] == site and row["model_kind"] == primary[method]
            ]
            mean, std, _ = mean_std(values)
            means.append(mean)
            stds.append(0.0 if math.isnan(std) else std)
        positions = [site_index + (index - (len(methods) - 1) / 2) * width for site_index in range(len(sites))]
        axes.bar(positions, means, width=width, yerr=stds, capsize=2, label=method)
    axes.set_xticks(range(len(sites)), sites)
    axes.set_ylim(0, 1)
    axes.set_ylabel("balanced accuracy (mean ± std over seeds)")
    axes.set_title("Balanced accuracy per site (scored model)")
    _legend(axes)


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def write_report(
    records: Sequence[RunRecord],
    out_dir: Path,
    method_notes: Mapping[str, str],
    header_lines: Sequence[str],
    log: Callable[[str], None] = print,
) -> list[Path]:
    """results.csv, summary.md and the PNGs under out_dir, from the finished run records."""
    rows = result_rows(records)
    write_results_csv(rows, out_dir / "results.csv")
    write_text_atomic(out_dir / "summary.md", summary_markdown(rows, records, method_notes, header_lines))
    paths = [out_dir / "results.csv", out_dir / "summary.md", *plot_all(rows, records, out_dir)]
    log("wrote " + ", ".join(str(path) for path in paths))
    return paths
