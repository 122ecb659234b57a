"""`python -m experiments.benchmark`: the powered benchmark, from cohort synthesis to the report, in resumable parts.

    python -m experiments.benchmark --part all            # pre-registration, headline, sweep, controls, report
    python -m experiments.benchmark --part headline       # one part (<= 45 min on 2 cores), then the report
    python -m experiments.benchmark --quick               # a smoke version of everything (minutes)

Parts (experiments.design): `preregister` fixes the hyperparameters on an h = 0 validation cohort
(experiments.preregistration) before any test set is scored; `headline` runs every method at h = 1; `sweep` five
methods at h = 0, 0.5 and 1.5 (h = 1 is the headline's); `controls` the negative (zero-shift) and positive
(concept-shift) controls; `privacy` the transport and privacy variants of a method at h = 1
(experiments.runs.VARIANTS), each compared with its base method's headline runs; `report` writes results.csv,
summary.md and the plots from the records. Every run leaves a small record in `<results>/records/`
(experiments.records); a unit (a method on a condition) whose records all exist is never run again, so a later
session resumes from committed records on a fresh machine. Cohorts and workspaces go to `--work` (not committed). A
federated method runs all its seeds in one simulator job (replicas), so NVFlare's start-up is paid once per method
and condition.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.benchmark_cohort import NOISE_SCHEME, BenchmarkCohortSpec
from data_prep.benchmark_cohort import SCHEMA as COHORT_SCHEMA
from experiments.cohorts import cohort_data
from experiments.design import DEFAULT_SEEDS, HEADLINE, PARTS, QUICK_SEEDS, Condition, Unit, conditions_of, units_of
from experiments.extend import DrawScorer, NotExtendable, draws_missing, extend_record
from experiments.preregistration import (
    Hyperparameters,
    hyperparameters_of,
    preregister,
    read_preregistration,
    settings_for,
)
from experiments.records import RECORD_SCHEMA, read_record, record_path, write_record
from experiments.runs import ALL_METHODS, RunSettings, run_unit
from experiments.sanity import SANITY_FILE, write_sanity
from models.atomic_io import write_json_atomic
from models.protocol import SEED_PLACEHOLDER
from models.standin import STANDIN

PART_NAMES = ("preregister", *PARTS, "report")
CONFIGURATION_FILE = "benchmark_configuration.json"
QUICK_SIZES = {"train_per_site": 12, "val_per_site": 12, "test_per_site": 40, "min_test_healthy": 12}
QUICK_HYPERPARAMETERS = Hyperparameters(rounds=2, local_epochs=1, lr=1e-3)
Log = Callable[[str], None]


class ConfigurationMismatch(RuntimeError):
    """The results folder holds records made with another configuration: adding to it would mix them."""


@dataclass(frozen=True)
class Sizes:
    """Per-site cohort sizes of every condition."""

    train_per_site: int = 40
    val_per_site: int = 40
    test_per_site: int = 300
    min_test_healthy: int = 90
    test_draws: int = 2
    """Two draws of 300: 600 test subjects a site, 180 of them healthy at least. One draw left the per-site AUROC
    interval wider than 0.05 at the site with the lowest AUROC (ge, about 0.75) whatever the seed count: the
    subjects alone give a half-width of about 0.055 there (Hanley-McNeil: 210 diseased, 90 healthy)."""

    def spec(self, condition: Condition) -> BenchmarkCohortSpec:
        return BenchmarkCohortSpec(
            heterogeneity=condition.heterogeneity,
            iid_sites=condition.iid_sites,
            concept_shift=condition.concept_shift,
            **asdict(self),
        )


def log(message: str) -> None:
    """Progress lines, flushed at once so that they interleave correctly with the subprocesses' output."""
    print(message, flush=True)


def check_configuration(results_dir: Path, configuration: Mapping[str, Any]) -> None:
    """Record the configuration in the results folder, or check that it equals the one recorded there."""
    path = results_dir / CONFIGURATION_FILE
    wanted = json.loads(json.dumps(configuration))
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != wanted:
            changed = sorted(key for key in set(recorded) | set(wanted) if recorded.get(key) != wanted.get(key))
            raise ConfigurationMismatch(
                f"{path}: these results were made with another configuration (differs in {', '.join(changed)}); "
                "use the same options or another --results folder"
            )
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, wanted)


def pending_seeds(results_dir: Path, unit: Unit, seeds: Sequence[int]) -> list[int]:
    """The seeds of a unit without a (readable) record."""
    pending = []
    for seed in seeds:
        path = record_path(results_dir, unit.condition.name, unit.method, seed)
        if not path.is_file():
            pending.append(seed)
            continue
        record = read_record(path)
        if (record["method"], record["seed"], record["condition"]["name"]) != (unit.method, seed, unit.condition.name):
            raise ValueError(f"{path}: fields method/seed/condition do not match its place")
    return pending


def run_units(
    units: Sequence[Unit],
    results_dir: Path,
    work_dir: Path,
    base: RunSettings,
    hyperparameters: Hyperparameters,
    sizes: Sizes,
    seeds: Sequence[int],
    workers: int,
) -> list[tuple[Unit, str]]:
    """Run every unit that lacks records (only its missing seeds) and write one record per seed; returns the units
    that failed (with their error). An interrupted unit leaves no record and runs again next time.

    A record made before the cohort gained test draws is extended with the run's exported models
    (experiments.extend) where they are still in `work_dir`, and its seed is run again where they are not.
    """
    failed = []
    data: dict[Condition, str] = {}
    scorer: DrawScorer | None = None
    for index, unit in enumerate(units, start=1):
        prefix = f"[{index}/{len(units)}] {unit.name}"
        spec = sizes.spec(unit.condition)
        cohort_dir = work_dir / "cohorts" / unit.condition.name
        unit_dir = work_dir / "runs" / unit.condition.name / unit.method
        todo = pending_seeds(results_dir, unit, seeds)
        recorded = [seed for seed in seeds if seed not in todo]
        short = [seed for seed in recorded if draws_missing(_record_of(results_dir, unit, seed), spec)]
        if not todo and not short:
            log(f"{prefix}: finished earlier, skipped")
            continue
        if unit.condition not in data:
            data[unit.condition] = cohort_data(cohort_dir, spec, seeds, workers, log)
        if short:
            if scorer is None or scorer.cohort_dir != cohort_dir:
                scorer = DrawScorer(cohort_dir)  # one condition's volumes and prefix features at a time
            todo += _extend(results_dir, unit, short, spec, scorer, unit_dir, prefix)
        if not todo:
            continue
        settings = settings_for(base, data[unit.condition], hyperparameters)
        shutil.rmtree(unit_dir, ignore_errors=True)
        todo.sort()
        log(f"{prefix}: running seeds {' '.join(map(str, todo))}")
        started = time.monotonic()
        try:
            bodies = run_unit(ALL_METHODS[unit.method], settings, todo, unit_dir)
        except Exception as error:  # one failed unit must not stop the others; it is reported and redone
            message = f"{type(error).__name__}: {error}"
            log(f"{prefix}: FAILED ({message}); continuing")
            failed.append((unit, message))
            continue
        for seed, body in bodies.items():
            record = {
                "schema": RECORD_SCHEMA,
                "condition": {"name": unit.condition.name, "role": unit.condition.role, **asdict(unit.condition)},
                "method": unit.method,
                "seed": seed,
                "hyperparameters": asdict(hyperparameters),
                "cohort": spec.settings(),
                **body,
            }
            write_record(record_path(results_dir, unit.condition.name, unit.method, seed), record)
        log(f"{prefix}: done in {time.monotonic() - started:.0f} s")
    return failed


def _extend(
    results_dir: Path,
    unit: Unit,
    seeds: Sequence[int],
    spec: BenchmarkCohortSpec,
    scorer: DrawScorer,
    unit_dir: Path,
    prefix: str,
) -> list[int]:
    """Extend the unit's records of `seeds` to the spec's test draws; returns the seeds that must run again."""
    again = []
    for seed in seeds:
        try:
            record = extend_record(_record_of(results_dir, unit, seed), spec, scorer, unit_dir, log)
        except NotExtendable as reason:
            log(f"{prefix}: seed {seed} runs again: its record lacks test draws and cannot be extended ({reason})")
            again.append(seed)
            continue
        write_record(record_path(results_dir, unit.condition.name, unit.method, seed), record)
        log(f"{prefix}: seed {seed}: record extended to {spec.test_draws} test draws")
    return again


def _record_of(results_dir: Path, unit: Unit, seed: int) -> dict[str, Any]:
    return read_record(record_path(results_dir, unit.condition.name, unit.method, seed))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark", description=__doc__.splitlines()[0], epilog=None
    )
    parser.add_argument("--part", nargs="+", choices=[*PART_NAMES, "all"], default=["all"])
    parser.add_argument("--quick", action="store_true", help="smoke version: small cohorts, 2 rounds, seeds 0 1")
    parser.add_argument("--results", type=Path, default=None, help="records and report (default docs/results)")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark"), help="cohorts and workspaces")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--workers", type=int, default=2, help="processes building the cohorts")
    parser.add_argument("--weights", default=STANDIN, help="standin (default), random, or a CineMA checkpoint path")
    parser.add_argument("--backbone", default=None, help="ConvViT preset for --weights random or a bare checkpoint")
    parser.add_argument("--batch-size", type=int, default=4)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    parts = list(PART_NAMES) if "all" in args.part else list(args.part)
    work_dir = (args.work / "quick" if args.quick else args.work).resolve()
    results_dir = (args.results or (work_dir / "results" if args.quick else Path("docs/results"))).resolve()
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    sizes = Sizes(**QUICK_SIZES) if args.quick else Sizes()
    base = RunSettings(data="", weights=args.weights, backbone=args.backbone, batch_size=args.batch_size, log=log)
    configuration = {
        "sizes": asdict(sizes),
        "cohort": {"schema": COHORT_SCHEMA, "noise": NOISE_SCHEME, "test_seed": sizes.spec(HEADLINE).test_seed},
        "weights": args.weights,
        "backbone": args.backbone,
        "quick": args.quick,
    }
    try:
        check_configuration(results_dir, configuration)
    except ConfigurationMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "preregister" in parts:
        if args.quick:
            log(f"quick: no pre-registration; smoke hyperparameters {asdict(QUICK_HYPERPARAMETERS)}")
        elif read_preregistration(results_dir) is not None:
            log(f"pre-registration: {results_dir / 'preregistration.json'} exists; it is never redone")
        else:
            log("pre-registration: tuning on the h = 0 validation cohort")
            preregister(results_dir, work_dir, base, args.workers, log)
    runs = [part for part in parts if part in PARTS]
    failed: list[tuple[Unit, str]] = []
    if runs:
        if args.quick:
            hyperparameters = QUICK_HYPERPARAMETERS
        else:
            preregistration = read_preregistration(results_dir)
            if preregistration is None:
                print("error: no pre-registration: run `--part preregister` first", file=sys.stderr)
                return 2
            hyperparameters = hyperparameters_of(preregistration)
        units = units_of(tuple(runs), quick=args.quick)
        log(f"{len(units)} units on {len(conditions_of(units))} conditions, seeds {' '.join(map(str, seeds))}")
        failed = run_units(units, results_dir, work_dir, base, hyperparameters, sizes, seeds, args.workers)
        if "headline" in runs and not (results_dir / SANITY_FILE).is_file():
            headline = cohort_data(
                work_dir / "cohorts" / HEADLINE.name, sizes.spec(HEADLINE), seeds, args.workers, log
            )
            write_sanity(results_dir, Path(headline.replace(SEED_PLACEHOLDER, str(seeds[0]))), log)
    if "report" in parts or runs:
        from experiments.report import write_report

        write_report(results_dir, log=log)
    for unit, message in failed:
        print(f"failed: {unit.name}: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
