"""`python -m jobs.demo --out runs/demo` (`make demo`): synthetic cohort -> NVFlare simulator run -> results table.

It synthesizes a multi-vendor cohort under OUT, prepares it to the committed stand-in backbone's input geometry
(its record's `prepare_args`) with test splits of at least 25 subjects a site, checks that no subject was in the
stand-in's pretraining cohort, runs the committed job with
`nvflare simulator jobs/med_duallora -w OUT/ws -c siemens,philips,ge,canon -t 2`, checks from the artifacts (not
the exit code) that the run completed, and prints per-site and pooled test scores of the personalised and the
global-only model (AUROC with 95 % bootstrap intervals; the rest at the validation thresholds), with the bytes each
site sent per round against the size of the full model.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from app.site_config import SITE_CONFIG_FILE, SiteConfig
from data_prep.cohort import Cohort, assert_disjoint_from_standin, build_cohort
from jobs.recipe import REPO
from jobs.simulate import SimulatorRun, last_epochs_only, run_simulator
from models.atomic_io import write_json_atomic, write_text_atomic
from models.metrics import bootstrap_auroc, subject_metrics
from models.protocol import DATA_ENV, SITES, STATE_ENV
from models.standin import RANDOM, STANDIN, prepare_args

JOB = REPO / "jobs" / "med_duallora"
SUBJECTS_PER_VENDOR = 64
SPLIT_FRACTIONS = ["--val-fraction", "0.2", "--test-fraction", "0.4"]
"""64 subjects a vendor: about 26 test, 13 validation and 25 training subjects a site."""
SCORES = ("bal_acc", "sensitivity", "specificity")
MODELS = ("personalised", "global_only")


def prepare_cohort(out: Path, subjects_per_vendor: int, seed: int) -> Path:
    """The demo cohort, synthesized and prepared for the stand-in backbone under `out` (data_prep.cohort reuses it
    while its settings hold); refuses a cohort that shares a subject with the stand-in's pretraining cohort."""
    prepared = build_cohort(out, Cohort(seed, subjects_per_vendor), [*prepare_args(), *SPLIT_FRACTIONS])
    assert_disjoint_from_standin(prepared)
    return prepared


def job_summary(run: SimulatorRun) -> str:
    """Rounds run, local epochs, backbone and weights of the committed job."""
    site = SiteConfig.read(JOB / "app" / "custom" / SITE_CONFIG_FILE)
    rounds = len({record["round"] for record in run.comm_records("up")})
    weights = {
        STANDIN: "the committed stand-in backbone (models/pretrained/standin, NOT CineMA)",
        RANDOM: "a RANDOM backbone (no pretrained weights: expect chance)",
    }.get(site.weights, f"weights {site.weights}")
    return f"{rounds} rounds x {site.local_epochs} local epochs, {weights}"


def score_row(predictions: Sequence[dict], thresholds: Sequence[float], seed: int) -> dict[str, float]:
    """AUROC with its bootstrap interval, and the threshold metrics, of subjects each decided at its own threshold."""
    scores = [row["p_diseased"] for row in predictions]
    labels = [row["label"] for row in predictions]
    decided = subject_metrics(scores, labels, thresholds)
    auroc, low, high = bootstrap_auroc(scores, labels, seed=seed)
    return {**{name: decided[name] for name in SCORES}, "auroc": auroc, "auroc_low": low, "auroc_high": high}


def results(run: SimulatorRun) -> dict[str, dict[str, dict[str, float]]]:
    """Per site and pooled (every subject scored by its own site's model at that model's threshold)."""
    reports = {site: run.test_metrics(site) for site in run.sites}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for model in MODELS:
        rows, pooled, pooled_thresholds = {}, [], []
        for index, (site, report) in enumerate(reports.items()):
            predictions, threshold = report["predictions"][model], report["thresholds"][model]
            rows[site] = {**score_row(predictions, [threshold] * len(predictions), seed=index), "n": len(predictions)}
            pooled += predictions
            pooled_thresholds += [threshold] * len(predictions)
        rows["pooled"] = {**score_row(pooled, pooled_thresholds, seed=len(reports)), "n": len(pooled)}
        table[model] = rows
    return table


def results_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Per-site and pooled test scores of the personalised and the global-only model."""
    header = f"{'AUROC [95% CI]':>22}" + "".join(f"{score[:11]:>12}" for score in SCORES)
    lines = [
        f"{'':<14}{'personalised (global + local adapter)':^58}  {'global-only (global adapter)':^58}",
        f"{'site':<9}{'n':>5}{header}  {header}",
    ]
    for site in table[MODELS[0]]:
        cells = "  ".join(_cells(table[model][site]) for model in MODELS)
        lines.append(f"{site:<9}{table[MODELS[0]][site]['n']:>5}{cells}")
    return "\n".join(lines)


def _cells(row: dict[str, float]) -> str:
    interval = f"{_number(row['auroc'])} [{_number(row['auroc_low'])}, {_number(row['auroc_high'])}]"
    return f"{interval:>22}" + "".join(f"{_number(row[score]):>12}" for score in SCORES)


def bytes_table(run: SimulatorRun) -> str:
    up = run.comm_records("up")
    lines = [f"{'site':<10}{'rounds':>7}{'sent/round (payload)':>22}{'raw tensors':>13}{'full model':>12}{'share':>8}"]
    for site in run.sites:
        records = [r for r in up if r["site"] == site]
        if not records:
            lines.append(f"{site:<10}{0:>7}  (no result reached the server)")
            continue
        payload = statistics.mean(r["payload_bytes"] for r in records)
        full = records[0]["full_model_bytes"]
        share = f"{payload / full:.1%}"
        row = f"{site:<10}{len(records):>7}{payload:>22,.0f}{records[0]['tensor_bytes']:>13,}{full:>12,}{share:>8}"
        lines.append(row)
    return "\n".join(lines)


def _say(line: str) -> None:
    print(f"  {line}", flush=True)


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="everything the demo makes goes here")
    parser.add_argument("--subjects-per-vendor", type=int, default=SUBJECTS_PER_VENDOR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="simulator: sites running at once")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_cohort(out, args.subjects_per_vendor, args.seed)
    env = {DATA_ENV: str(prepared)}
    os.environ.pop(STATE_ENV, None)  # site state stays in each site's simulator workspace, which the run wipes first
    workspace = out / "ws"
    print(f"running: nvflare simulator {JOB.relative_to(REPO)} -w {workspace} -c {','.join(SITES)} -t {args.threads}")
    progress = last_epochs_only(_say)
    run = run_simulator(
        JOB, workspace, SITES, args.threads, env=env, log_file=out / "simulator.log", progress=progress
    )
    problems = run.problems()
    if problems:
        print(f"the federated run did not complete (simulator exit code {run.returncode}):", *problems, sep="\n  ")
        print(f"logs: {workspace}/*/log.txt and {out / 'simulator.log'}")
        return 1
    print(f"\nfederated run completed in {run.seconds:.0f} s (checked from its artifacts); {job_summary(run)}\n")
    scores = results(run)
    table = results_table(scores) + "\n\nbytes each site sent per round (uplink):\n" + bytes_table(run)
    print(table)
    write_text_atomic(out / "results.txt", table + "\n")
    write_json_atomic(out / "results.json", scores)
    print(f"\nmodels: the global model in {run.global_model_dir}")
    print(f"        each site's personalised model in {run.personalised_model_dir('<site>')}")
    print(f"score a study: .venv/bin/python -m app.predict --model {run.personalised_model_dir('ge')} \\")
    print("                 --ed ED.nii.gz --es ES.nii.gz --out prediction.json   (README: Using the trained models)")
    print(f"TensorBoard: tensorboard --logdir {run.server_dir / 'tb_events'}")
    print(f"table saved to {out / 'results.txt'}; server run folder {run.server_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
