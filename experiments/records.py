"""The benchmark's results as small files that can be committed and merged: one gzipped JSON record per run.

A run is one method on one condition with one seed. Its record holds, per site and scored model, the decision
threshold and P(diseased) of every test subject (and of its Siemens-profile rendering), so that every statistic
(intervals, paired differences, calibration) is computed later from the records alone. A later session, on a fresh
machine, finds the finished runs from these files and does not redo them.

A record (JSON):
- `schema`, `method` (experiments.runs.ALL_METHODS), `seed`;
- `condition`: `name` (e.g. `h1.0`, `h0.0_iid_shift-ge`), `role` (headline, sweep, negative control, positive
  control), `heterogeneity`, `iid_sites`, `concept_shift` (experiments.design.Condition);
- `hyperparameters` (experiments.preregistration.Hyperparameters), `cohort` (BenchmarkCohortSpec.settings());
- `sites`: per site, `test_ids` and `test_labels` (1 = diseased) in one order, `val_ids` and `val_labels`, and
  `models`: per scored model kind (`personalised`, `global`, `central`), its validation `threshold` (diseased when
  P > threshold) and P(diseased) lists `test`, `test_siemens` (the same hearts rendered with the Siemens profile,
  in the `test_ids` order) and `val`;
- `rounds`: per round and site, the validation `auroc` and `bal_acc` of the site's model before local training;
- `cost`: `params` (total, trainable, shared), `bytes_sent_per_client_round` (None: centralized), `job_wall_s`
  (the simulator job's, shared by its `seeds_in_job` replicas) and `seeds_in_job`;
- `not_evaluable`: model kinds the method has no usable model of, with the reason;
- `privacy` (only for a run under DP-SGD): `delta`, each site's spent `epsilon_per_site` (from its exported model's
  metadata) and their maximum `epsilon`, the run's guarantee for any one patient (docs/privacy.md);
- `test_draws_from_exported_models` (only in a record extended by experiments.extend): the test draws its run's
  exported models scored after the run, and the largest difference from the record's own scores found when checking
  them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.atomic_io import write_bytes_atomic

RECORD_SCHEMA = "med-duallora/benchmark-record/1"
RECORDS_DIR = "records"
RECORD_FIELDS = ("schema", "condition", "method", "seed", "hyperparameters", "sites", "rounds", "cost")
SITE_FIELDS = ("test_ids", "test_labels", "models")
EXTENSION_FIELD = "test_draws_from_exported_models"
SCORE_DIGITS = 5
"""P(diseased) is kept to 5 decimals: far below any difference the benchmark can resolve, and small files."""


class RecordError(ValueError):
    """A record file that cannot be used: unreadable, another schema, or a field missing or malformed."""


def record_path(results_dir: Path, condition: str, method: str, seed: int) -> Path:
    """`<results>/records/<condition>/<method>__seed<N>.json.gz`."""
    return Path(results_dir) / RECORDS_DIR / condition / f"{method}__seed{seed}.json.gz"


def rounded(scores: Iterable[float]) -> list[float]:
    return [round(float(score), SCORE_DIGITS) for score in scores]


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    """Write a record atomically (a half-written record never looks finished); its fields are checked first."""
    _check(path, record)
    payload = json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")
    write_bytes_atomic(path, gzip.compress(payload, mtime=0))


def read_record(path: Path) -> dict[str, Any]:
    """A record, checked: RecordError naming the file and the field otherwise."""
    try:
        record = json.loads(gzip.decompress(Path(path).read_bytes()))
    except (OSError, EOFError, ValueError) as error:
        raise RecordError(f"{path}: unreadable benchmark record ({error})") from error
    _check(path, record)
    return record


def _check(path: Path, record: Mapping[str, Any]) -> None:
    missing = [name for name in RECORD_FIELDS if name not in record]
    if missing:
        raise RecordError(f"{path}: field(s) {missing} missing")
    if record["schema"] != RECORD_SCHEMA:
        raise RecordError(f"{path}: field schema is {record['schema']!r}, expected {RECORD_SCHEMA!r}")
    for site, entry in record["sites"].items():
        missing = [name for name in SITE_FIELDS if name not in entry]
        if missing:
            raise RecordError(f"{path}: field sites.{site} lacks {missing}")
        n = len(entry["test_ids"])
        if len(entry["test_labels"]) != n:
            raise RecordError(f"{path}: field sites.{site}.test_labels has {len(entry['test_labels'])} values for {n}")
        for kind, model in entry["models"].items():
            if len(model.get("test", [])) != n:
                raise RecordError(f"{path}: field sites.{site}.models.{kind}.test does not score the {n} subjects")


def read_records(results_dir: Path) -> list[dict[str, Any]]:
    """Every record under `<results>/records/`, in a stable order (condition, method, seed)."""
    paths = sorted((Path(results_dir) / RECORDS_DIR).glob("*/*.json.gz"))
    return [read_record(path) for path in paths]
