"""NVFlare's fixed cost per benchmark run, with one run per simulator job and with several seeds (replicas) per job.

`python bench/fixed_cost.py` prints one JSON object. It runs the benchmark's workload (the `med_duallora` job on
the benchmark's h = 1 cohorts: 40 training, 40 validation and 300 + 300 reference test subjects a site, the
pre-registered hyperparameters, 4 sites as 4 simulator threads) as a job of one replica and as a job of `--seeds`
replicas (custom.controller), and splits the wall time into:
- `per_run_s`: what one more seed adds to a job (its rounds, final evaluation, export): (wall(k) - wall(1)) / (k - 1);
- `fixed_s`: what a job costs beyond its runs (simulator and site processes starting, imports, shutdown):
  wall(1) - per_run_s.
`fixed_share_of_run` is the fixed cost's share of one run's wall time, fixed / (fixed + k x per_run) per run, for a
job of one run and for a job of k replicas (the benchmark's). Target: <= 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from data_prep.benchmark_cohort import ROOT_PREFIX, BenchmarkCohortSpec, build_benchmark_roots
from jobs.recipe import FederationConfig, export_job
from jobs.simulate import run_simulator
from models.protocol import DATA_ENV, SEED_PLACEHOLDER, SITES, STATE_ENV
from models.standin import prepare_args

TARGET_FIXED_SHARE = 0.25


def data_pattern(out: Path, roots: dict[int, Path]) -> str:
    """The `$MED_DUALLORA_DATA` value that names every seed's root (`<out>/seed_{seed}`)."""
    pattern = str(out / f"{ROOT_PREFIX}{SEED_PLACEHOLDER}")
    if any(pattern.replace(SEED_PLACEHOLDER, str(seed)) != str(root) for seed, root in roots.items()):
        raise ValueError(f"the seeds' prepared roots do not follow {pattern}: {roots}")
    return pattern


def pre_registered(path: Path) -> dict[str, float]:
    """The benchmark's pre-registered rounds, local epochs, learning rate and batch size (defaults without one)."""
    chosen = json.loads(path.read_text(encoding="utf-8"))["chosen"] if path.is_file() else {}
    defaults = {"rounds": 5, "local_epochs": 2, "lr": 1e-3, "batch_size": 4}
    return {name: chosen.get(name, value) for name, value in defaults.items()}


def timed_job(out: Path, seeds: Sequence[int], data: str, hyperparameters: dict[str, float]) -> float:
    """Wall seconds of one simulator job running `seeds` as replicas (one seed: an ordinary job), from its export to
    its artifacts checked, as the benchmark runs a unit."""
    name = f"fixed_cost_{len(seeds)}"
    config = FederationConfig.for_method(
        "med_duallora",
        rounds=int(hyperparameters["rounds"]),
        min_clients=len(SITES),
        name=name,
        local_epochs=int(hyperparameters["local_epochs"]),
        lr=hyperparameters["lr"],
        batch_size=int(hyperparameters["batch_size"]),
        seed=seeds[0],
        threads=1,
        replica_seeds=tuple(seeds) if len(seeds) > 1 else (),
    )
    started = time.monotonic()
    job = export_job(config, out / "jobs")
    env = {DATA_ENV: data, STATE_ENV: str(out / f"state_{name}")}
    run = run_simulator(job, out / f"ws_{name}", SITES, threads=len(SITES), env=env, log_file=out / f"{name}.log")
    if run.problems():
        raise RuntimeError(f"{name}: the run did not complete: {run.problems()[:3]}")
    return time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/fixed_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fixed_cost"))
    parser.add_argument("--seeds", type=int, default=3, help="replicas per job, as the benchmark runs them")
    parser.add_argument(
        "--cohort",
        type=Path,
        default=Path("runs/benchmark/cohorts/h1.0"),
        help="the benchmark's h = 1 cohort folder (reused when the benchmark built it, else built here)",
    )
    parser.add_argument("--preregistration", type=Path, default=Path("docs/results/preregistration.json"))
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (the cost of one more seed is measured)")
    out = args.out.resolve()
    seeds = list(range(args.seeds))
    cohort = args.cohort.resolve()
    roots = build_benchmark_roots(cohort, BenchmarkCohortSpec(), seeds, prepare_args(), workers=2)
    data = data_pattern(cohort, roots)
    hyperparameters = pre_registered(args.preregistration)
    one = timed_job(out, seeds[:1], data, hyperparameters)
    several = timed_job(out, seeds, data, hyperparameters)
    per_run = (several - one) / (args.seeds - 1)
    fixed = one - per_run
    report = {
        "fixed_share_of_run": {
            "one_run_per_job": round(fixed / (fixed + per_run), 3),
            f"{args.seeds}_replicas_per_job": round(fixed / (fixed + args.seeds * per_run), 3),
        },
        "target": TARGET_FIXED_SHARE,
        "fixed_s": round(fixed, 1),
        "per_run_s": round(per_run, 1),
        "wall_s": {"1_replica": round(one, 1), f"{args.seeds}_replicas": round(several, 1)},
        "workload": {
            "method": "med_duallora",
            **hyperparameters,
            "cohort": "benchmark h = 1: 40 train, 40 val, 300 test + 300 Siemens-profile test subjects a site",
            "simulator_threads": len(SITES),
            "cpu_count": os.cpu_count(),
        },
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
