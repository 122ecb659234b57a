"""Pre-registration: the benchmark's hyperparameters, chosen on an h = 0 validation cohort before any test set counts.

A small grid (local epochs x learning rate; LoRA ranks stay at the paper's r = 8) is run for `med_duallora`
and `fedit` on a cohort of its own (h = 0, its own seeds and its own test seed, so none of the benchmark's test sets
is ever scored here). The point with the highest mean validation AUROC over both methods and the four sites wins
(ties: the cheaper point). The choice and every grid score are written to `preregistration.json` in the results
folder, which the benchmark's parts read and which is never rewritten once it exists.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.benchmark_cohort import BenchmarkCohortSpec
from experiments.cohorts import cohort_data
from experiments.runs import METHODS, RunSettings, run_unit
from experiments.stats import auroc
from models.atomic_io import write_json_atomic

PREREGISTRATION_FILE = "preregistration.json"
TUNING_METHODS = ("med_duallora", "fedit")
TUNING_SEED = 500
TUNING_TEST_SEED = 20_000
"""The tuning cohort's own test seed: the benchmark's test sets (test seed 10,000) are never scored while tuning."""
GRID = {"rounds": (5,), "local_epochs": (1, 2), "lr": (1e-3, 3e-3)}
"""The points tried: learning rate and local epochs at 5 rounds. Five rounds of at most two epochs is what the whole
benchmark can afford on 2 cores (its budget: 90 minutes; bench/fixed_cost.py), so no longer schedule is offered."""
TUNING_MODEL_KIND = {"med_duallora": "personalised", "fedit": "global"}


@dataclass(frozen=True)
class Hyperparameters:
    """What the pre-registration fixes for every run of the benchmark."""

    rounds: int
    local_epochs: int
    lr: float
    batch_size: int = 4
    lora_rank: int = 8

    @property
    def cost(self) -> int:
        """Local epochs per run: what a tie is broken on."""
        return self.rounds * self.local_epochs


def tuning_spec() -> BenchmarkCohortSpec:
    """The tuning cohort: h = 0, the benchmark's training and validation sizes, a small test set of its own."""
    return BenchmarkCohortSpec(heterogeneity=0.0, test_per_site=20, min_test_healthy=6, test_seed=TUNING_TEST_SEED)


def grid_points(batch_size: int) -> list[Hyperparameters]:
    return [
        Hyperparameters(rounds, epochs, lr, batch_size)
        for rounds, epochs, lr in itertools.product(GRID["rounds"], GRID["local_epochs"], GRID["lr"])
    ]


def validation_auroc(record: Mapping[str, Any], kind: str) -> float:
    """Mean over sites of the validation AUROC of one scored model of a run (a record's body)."""
    values = [
        auroc(np.array(site["val_labels"]), np.array(site["models"][kind]["val"])) for site in record["sites"].values()
    ]
    return float(np.mean(values))


def read_preregistration(results_dir: Path) -> dict[str, Any] | None:
    path = Path(results_dir) / PREREGISTRATION_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def hyperparameters_of(preregistration: Mapping[str, Any]) -> Hyperparameters:
    return Hyperparameters(**preregistration["chosen"])


def preregister(
    results_dir: Path, work_dir: Path, base: RunSettings, workers: int = 2, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Build the tuning cohort, run the grid on it and write the pre-registration; refuses to overwrite one."""
    path = Path(results_dir) / PREREGISTRATION_FILE
    if path.exists():
        raise FileExistsError(f"{path}: the hyperparameters are pre-registered already and are never changed")
    data = cohort_data(Path(work_dir) / "cohorts" / "tuning", tuning_spec(), [TUNING_SEED], workers, log)
    scores = []
    for point in grid_points(base.batch_size):
        settings = settings_for(base, data, point)
        per_method = {}
        for method in TUNING_METHODS:
            unit_dir = Path(work_dir) / "tuning" / _point_name(point) / method
            shutil.rmtree(unit_dir, ignore_errors=True)
            started = time.monotonic()
            record = run_unit(METHODS[method], settings, [TUNING_SEED], unit_dir)[TUNING_SEED]
            per_method[method] = validation_auroc(record, TUNING_MODEL_KIND[method])
            log(f"  tuning {_point_name(point)} {method}: validation AUROC {per_method[method]:.3f} "
                f"({time.monotonic() - started:.0f} s)")  # fmt: skip
        scores.append({"hyperparameters": asdict(point), "val_auroc": per_method, "mean": _mean(per_method)})
    best = max(scores, key=lambda entry: (entry["mean"], -Hyperparameters(**entry["hyperparameters"]).cost))
    preregistration = {
        "chosen": best["hyperparameters"],
        "criterion": "mean validation AUROC over med_duallora (personalised) and fedit (global) and the four sites; "
        "ties broken by fewer local epochs per run",
        "grid": scores,
        "tuning_cohort": {**tuning_spec().settings(), "seed": TUNING_SEED},
        "fixed_without_tuning": {"lora_rank": 8, "lora_alpha": 16, "batch_size": base.batch_size},
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
    }
    write_json_atomic(path, preregistration)
    return preregistration


def _point_name(point: Hyperparameters) -> str:
    return f"r{point.rounds}_e{point.local_epochs}_lr{point.lr:g}"


def _mean(values: Mapping[str, float]) -> float:
    finite = [value for value in values.values() if math.isfinite(value)]
    return float(np.mean(finite)) if finite else math.nan


def _commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or None


def settings_for(base: RunSettings, data: str, hyperparameters: Hyperparameters) -> RunSettings:
    """Run settings with the given hyperparameters over `data` (a `{seed}` pattern of prepared roots)."""
    return RunSettings(
        data=data,
        weights=base.weights,
        backbone=base.backbone,
        rounds=hyperparameters.rounds,
        local_epochs=hyperparameters.local_epochs,
        lr=hyperparameters.lr,
        batch_size=hyperparameters.batch_size,
        simulator_threads=base.simulator_threads,
        sites=base.sites,
        log=base.log,
    )
