"""`python -m data_prep.prepare`: find raw or CineMA-preprocessed inputs, preprocess in parallel, split, write."""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_prep.nifti import PARTIAL_SUFFIX
from data_prep.preprocess import Geometry, preprocess, write_volume
from data_prep.readers import discover
from data_prep.records import InputError, LabelRule, SubjectRecord, parse_label_overrides
from data_prep.report import (
    MANIFEST_COLUMNS,
    PREPARED_FILE,
    PREPARED_SCHEMA,
    split_counts,
    split_warnings,
    summary,
    write_csv_atomic,
    write_skipped,
)
from data_prep.splits import assign_splits
from models.atomic_io import write_json_atomic

VOLUME_FOLDER = "volumes"
MAX_TASKS_PER_WORKER = 64
"""Subjects a worker process prepares before it is replaced (bounds what a slow leak in a library can grow to)."""
IN_FLIGHT_PER_WORKER = 2
"""Subjects submitted per worker and not yet consumed: keeps every worker busy while memory stays bounded."""


class WorkerCrashError(RuntimeError):
    """A worker process died (e.g. killed by the out-of-memory killer): the run cannot be completed."""


@dataclass
class PrepareResult:
    """Rows written to manifest.csv, inputs refused or not recognised (the rows of skipped.csv), whether --strict
    stopped the run, and the warnings about degenerate splits or absent sites (as in prepared.json)."""

    rows: list[dict[str, object]]
    problems: list[InputError]
    stopped: bool
    warnings: list[str] = field(default_factory=list)


def _worker_init() -> None:
    """One intra-op thread per worker process: parallelism comes from the processes."""
    torch.set_num_threads(1)


def prepare_subject(record: SubjectRecord, geometry: Geometry, out_root: Path) -> dict[str, object] | InputError:
    """Preprocess and write one subject; returns its manifest row (without split) or the reason it was refused."""
    try:
        prepared = preprocess(record, geometry)
    except InputError as error:
        return error
    except Exception as error:  # an unexpected failure on one subject must not hide the others
        return InputError(record.source, f"preprocessing failed ({type(error).__name__}: {error})")
    relative = Path(VOLUME_FOLDER) / record.client / f"{record.subject_id}.nii.gz"
    write_volume(prepared, out_root / relative)
    sx, sy, sz = prepared.original_spacing
    return {
        "subject_id": record.subject_id,
        "dataset": record.dataset,
        "vendor": record.vendor,
        "client": record.client,
        "pathology": record.pathology,
        "label": record.label,
        "image": relative.as_posix(),
        "layout": record.layout,
        "centre": record.centre,
        "source": str(record.source),
        "n_slices": prepared.n_slices,
        "orig_spacing_x": round(sx, 4),
        "orig_spacing_y": round(sy, 4),
        "orig_spacing_z": round(sz, 4),
        "crop_method": prepared.crop_method,
    }


def _results(
    records: list[SubjectRecord], geometry: Geometry, out_root: Path, workers: int
) -> Iterator[dict[str, object] | InputError]:
    """Results in record order; with workers > 1 they come from forked worker processes (see `_pool_results`)."""
    if workers <= 1:
        _worker_init()
        for record in records:
            yield prepare_subject(record, geometry, out_root)
        return
    batch = workers * MAX_TASKS_PER_WORKER
    for start in range(0, len(records), batch):
        yield from _pool_results(records[start : start + batch], geometry, out_root, workers)


def _pool_results(
    records: list[SubjectRecord], geometry: Geometry, out_root: Path, workers: int
) -> Iterator[dict[str, object] | InputError]:
    """Results of `records` in order from one executor of forked workers, at most 2 per worker in flight.

    The executor is not reused across batches: `max_tasks_per_child` cannot be combined with the fork start method
    (ProcessPoolExecutor raises ValueError), so `_results` recycles workers by starting one executor per batch.
    A worker that dies raises WorkerCrashError naming the subjects in flight.
    """
    context = multiprocessing.get_context("fork")
    executor = ProcessPoolExecutor(min(workers, len(records)), mp_context=context, initializer=_worker_init)
    pending = iter(records)
    window: deque[tuple[SubjectRecord, Future]] = deque()

    def submit(count: int) -> None:
        for record in itertools.islice(pending, count):
            window.append((record, executor.submit(prepare_subject, record, geometry, out_root)))

    try:
        submit(IN_FLIGHT_PER_WORKER * workers)
        while window:
            try:
                result = window[0][1].result()
            except BrokenProcessPool as error:
                raise WorkerCrashError(_crash_message(window, error)) from error
            window.popleft()
            submit(1)
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _crash_message(window: deque[tuple[SubjectRecord, Future]], error: BrokenProcessPool) -> str:
    """Why the pool broke and the subjects in flight (a dead worker was preparing one of them)."""
    lost = [record for record, future in window if future.done() and isinstance(future.exception(), BrokenProcessPool)]
    subjects = "; ".join(f"{record.subject_id} (source {record.source})" for record in lost)
    return (
        "a worker process died (killed by a signal, e.g. the out-of-memory killer) or a result could not be read "
        f"back{_remote_cause(error)}; subjects in flight: {subjects}. No manifest.csv was written"
    )


def _remote_cause(error: BrokenProcessPool) -> str:
    """The error that broke the pool, e.g. a result that failed to unpickle, as ' (...)'; '' for a killed worker."""
    text = str(error.__cause__) if error.__cause__ is not None else ""
    lines = [line.strip() for line in text.strip().strip("'").splitlines() if line.strip()]
    return f" ({lines[-1]})" if lines else ""


def _clean_output(out_root: Path) -> None:
    """Remove the previous manifest / skipped list / prepared.json and any partial file a crash left behind."""
    for name in ("manifest.csv", "skipped.csv", PREPARED_FILE):
        (out_root / name).unlink(missing_ok=True)
    for partial in out_root.rglob(f"*{PARTIAL_SUFFIX}"):
        partial.unlink()


def run_prepare(
    raw_dirs: Sequence[Path],
    out_root: Path,
    seed: int,
    geometry: Geometry | None = None,
    rule: LabelRule | None = None,
    strict: bool = False,
    workers: int = 1,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> PrepareResult:
    """The whole prepare step; writes manifest.csv and prepared.json (unless --strict stopped it) and skipped.csv
    under `out_root`.

    Defaults: CineMA's geometry and the label rule NOR = 0, every other code = 1. A worker process that dies raises
    WorkerCrashError and nothing is written (manifest.csv is only written at the end, atomically). NIfTI files no
    reader recognises are listed in skipped.csv after the refused subjects; they never stop a --strict run.
    """
    geometry = geometry or Geometry()
    rule = rule or LabelRule()
    for raw in raw_dirs:
        if not Path(raw).is_dir():
            raise FileNotFoundError(f"--raw {raw}: not a folder")
    out_root.mkdir(parents=True, exist_ok=True)
    _clean_output(out_root)
    found = discover([Path(raw) for raw in raw_dirs], rule)
    problems = list(found.problems)
    if strict and problems:
        write_skipped(out_root / "skipped.csv", problems[:1])
        return PrepareResult([], problems[:1], stopped=True)
    rows: list[dict[str, object]] = []
    with closing(_results(found.records, geometry, out_root, workers)) as results:
        for result in results:
            if isinstance(result, InputError):
                problems.append(result)
                if strict:
                    write_skipped(out_root / "skipped.csv", problems)
                    return PrepareResult(rows, problems, stopped=True)
            else:
                rows.append(result)
    splits = assign_splits(
        ((str(r["subject_id"]), str(r["client"]), int(r["label"])) for r in rows), seed, val_fraction, test_fraction
    )
    for row in rows:
        row["split"] = splits[str(row["subject_id"])]
    rows.sort(key=lambda r: (str(r["client"]), str(r["subject_id"])))
    write_csv_atomic(out_root / "manifest.csv", MANIFEST_COLUMNS, rows)
    problems.extend(found.unrecognised)
    write_skipped(out_root / "skipped.csv", problems)
    warnings = write_prepared(out_root, rows, geometry, rule, seed, (val_fraction, test_fraction))
    return PrepareResult(rows, problems, stopped=False, warnings=warnings)


def write_prepared(
    out_root: Path,
    rows: list[dict[str, object]],
    geometry: Geometry,
    rule: LabelRule,
    seed: int,
    fractions: tuple[float, float],
) -> list[str]:
    """Write `<out_root>/prepared.json` (settings, counts per site and split, warnings); returns the warnings."""
    counts = split_counts(rows)
    warnings = split_warnings(counts)
    record = {
        "schema": PREPARED_SCHEMA,
        "geometry": geometry_fields(geometry),
        "seed": seed,
        "val_fraction": fractions[0],
        "test_fraction": fractions[1],
        "label_rule": dict(rule.overrides),
        "counts": counts,
        "warnings": warnings,
    }
    write_json_atomic(out_root / PREPARED_FILE, record)
    return warnings


def geometry_fields(geometry: Geometry) -> dict[str, object]:
    """prepared.json `geometry`: crop (voxels), spacing_mm and depth (slices)."""
    return {
        "crop": [int(v) for v in geometry.crop],
        "spacing_mm": [float(v) for v in geometry.spacing],
        "depth": int(geometry.depth),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (design.md contract plus geometry, workers and label overrides)."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__)
    parser.add_argument("--raw", type=Path, action="append", required=True, help="input folder (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="prepared root to write")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument(
        "--strict", action="store_true", help="stop with exit 1 at the first bad subject (unrecognised files do not)"
    )
    parser.add_argument("--crop", type=int, nargs=2, default=[192, 192], metavar=("X", "Y"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 10.0], metavar=("X", "Y", "Z"))
    parser.add_argument("--depth", type=int, default=16, help="slices after z padding")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument(
        "--label-override", action="append", default=[], metavar="CODE=0|1", help="e.g. AHS=0 (default: NOR 0, else 1)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        rule = LabelRule(parse_label_overrides(args.label_override))
        geometry = Geometry(tuple(args.crop), tuple(args.spacing), args.depth)
        result = run_prepare(
            args.raw,
            args.out,
            args.seed,
            geometry,
            rule,
            args.strict,
            args.workers,
            args.val_fraction,
            args.test_fraction,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except WorkerCrashError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for problem in result.problems[:20]:
        print(f"skipped: {problem.path}: {problem.reason}", file=sys.stderr)
    if len(result.problems) > 20:
        print(f"... {len(result.problems) - 20} more in {args.out / 'skipped.csv'}", file=sys.stderr)
    if result.stopped:
        print("error: --strict: stopped at the first bad subject (see skipped.csv)", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary(result.rows, len(result.problems), len(result.warnings)))
    if not result.rows:
        print(f"error: {_nothing_prepared(args.raw, args.out, len(result.problems))}", file=sys.stderr)
        return 1
    return 0


def _nothing_prepared(raw_dirs: Sequence[Path], out_root: Path, n_skipped: int) -> str:
    """Why no subject was prepared: the skipped list to read, or no NIfTI input at all."""
    where = f"no subject prepared from {', '.join(map(str, raw_dirs))}"
    if n_skipped:
        return f"{where}: {n_skipped} input(s) skipped, each with its reason in {out_root / 'skipped.csv'}"
    return f'{where}: no .nii.gz / .nii file found under it (see README "Input layouts")'


if __name__ == "__main__":
    sys.exit(main())
