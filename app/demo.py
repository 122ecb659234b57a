"""`python -m app.demo --out runs/demo` (`make demo`): synthetic cohort -> NVFlare simulator run -> results table.

It synthesizes and prepares a small multi-vendor cohort under OUT, runs the committed job with
`nvflare simulator jobs/med_duallora -w OUT/ws -c siemens,philips,ge,canon -t 2`, checks from the artifacts (not
the exit code) that the run completed, and prints per-site and mean scores of the personalised and the global-only
model, with the bytes each site sent per round against the size of the full model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from app.client import parse_args
from custom.site_state import STATE_ENV
from jobs.recipe import REPO, SITES
from jobs.simulate import SimulatorRun, run_simulator

JOB = REPO / "jobs" / "med_duallora"
MICRO_GEOMETRY = ["--crop", "64", "64", "--spacing", "2", "2", "10", "--depth", "8"]
SUBJECTS_PER_VENDOR = 32
SCORES = ("bal_acc", "sensitivity", "specificity", "auroc")
MODELS = ("personalised", "global_only")


def prepare_cohort(out: Path, subjects_per_vendor: int, seed: int) -> Path:
    """Synthesize the raw cohort and prepare it for the micro ConvViT (reused when already there, same settings)."""
    prepared = out / "prepared"
    stamp = out / "cohort.json"
    settings = {"subjects_per_vendor": subjects_per_vendor, "seed": seed, "geometry": MICRO_GEOMETRY}
    if (prepared / "manifest.csv").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"reusing the prepared cohort in {prepared}")
        return prepared
    for folder in (out / "raw", prepared):
        shutil.rmtree(folder, ignore_errors=True)
    python = sys.executable
    synthesize = ["-m", "data_prep.synthesize", "--out", str(out / "raw"), "--seed", str(seed), "--workers", "2"]
    _step("synthesizing", [python, *synthesize, "--subjects-per-vendor", str(subjects_per_vendor)])
    prepare = ["-m", "data_prep.prepare", "--raw", str(out / "raw"), "--out", str(prepared), "--seed", str(seed)]
    _step("preparing", [python, *prepare, *MICRO_GEOMETRY, "--workers", "2"])
    stamp.write_text(json.dumps(settings))
    return prepared


def _step(title: str, command: list[str]) -> None:
    print(f"{title}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def job_summary(run: SimulatorRun) -> str:
    """Rounds run, local epochs, backbone and weights of the committed job."""
    client = json.loads((JOB / "app" / "config" / "config_fed_client.json").read_text(encoding="utf-8"))
    args = parse_args(shlex.split(client["executors"][0]["executor"]["args"]["task_script_args"]))
    rounds = len({record["round"] for record in run.comm_records("up")})
    weights = f"weights {args.weights}" if args.weights else "random backbone (no pretrained weights: near chance)"
    return f"{rounds} rounds x {args.local_epochs} local epochs, {args.backbone} ConvViT, {weights}"


def results_table(run: SimulatorRun) -> str:
    """Per-site and mean test scores of the personalised and the global-only model."""
    reports = {site: run.test_metrics(site) for site in run.sites}
    columns = "".join(f"{score[:11]:>12}" for score in SCORES)
    lines = [
        f"{'':<17}{'personalised (global + local)':^48}{'global-only':^48}",
        f"{'site':<10}{'n_test':>7}{columns}{columns}",
    ]
    for site, report in reports.items():
        cells = "".join(f"{_number(report['models'][model][score]):>12}" for model in MODELS for score in SCORES)
        lines.append(f"{site:<10}{report['n_test']:>7}{cells}")
    means = [_mean([r["models"][model][score] for r in reports.values()]) for model in MODELS for score in SCORES]
    lines.append(f"{'mean':<10}{'':>7}" + "".join(f"{_number(m):>12}" for m in means))
    return "\n".join(lines)


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


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.mean(finite) if finite else math.nan


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
    env = {"MED_DUALLORA_DATA": str(prepared)}
    os.environ.pop(STATE_ENV, None)  # site state stays in each site's simulator workspace, which the run wipes first
    workspace = out / "ws"
    print(f"running: nvflare simulator {JOB.relative_to(REPO)} -w {workspace} -c {','.join(SITES)} -t {args.threads}")
    run = run_simulator(JOB, workspace, SITES, args.threads, env=env, log_file=out / "simulator.log")
    problems = run.problems()
    if problems:
        print(f"the federated run did not complete (simulator exit code {run.returncode}):", *problems, sep="\n  ")
        print(f"logs: {workspace}/*/log.txt and {out / 'simulator.log'}")
        return 1
    print(f"\nfederated run completed in {run.seconds:.0f} s (checked from its artifacts); {job_summary(run)}\n")
    table = results_table(run) + "\n\nbytes each site sent per round (uplink):\n" + bytes_table(run)
    print(table)
    (out / "results.txt").write_text(table + "\n")
    print(f"\nTensorBoard: tensorboard --logdir {run.server_dir / 'tb_events'}")
    print(f"table saved to {out / 'results.txt'}; server run folder {run.server_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
