"""`python -m data_prep.prepare`: find raw or CineMA-preprocessed inputs, preprocess in parallel, split, write."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.nifti import PARTIAL_SUFFIX
from data_prep.preprocess import Geometry, preprocess, write_volume
from data_prep.readers import discover
from data_prep.records import InputError, LabelRule, SubjectRecord, parse_label_overrides
from data_prep.report import MANIFEST_COLUMNS, summary, write_csv_atomic, write_skipped
from data_prep.splits import assign_splits

VOLUME_FOLDER = "volumes"
MAX_TASKS_PER_WORKER = 64


@dataclass
class PrepareResult:
    """Rows written to manifest.csv, inputs refused, and whether --strict stopped the run."""

    rows: list[dict[str, object]]
    problems: list[InputError]
    stopped: bool


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


def _prepare_task(task: tuple[SubjectRecord, Geometry, Path]) -> dict[str, object] | InputError:
    return prepare_subject(*task)


def _results(
    records: list[SubjectRecord], geometry: Geometry, out_root: Path, workers: int
) -> Iterator[dict[str, object] | InputError]:
    """Results in record order; several processes when workers > 1 (each holds one subject at a time)."""
    tasks = [(record, geometry, out_root) for record in records]
    if workers <= 1 or len(tasks) <= 1:
        _worker_init()
        yield from map(_prepare_task, tasks)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_worker_init, maxtasksperchild=MAX_TASKS_PER_WORKER) as pool:
        yield from pool.imap(_prepare_task, tasks, chunksize=1)


def _clean_output(out_root: Path) -> None:
    """Remove the previous manifest / skipped list and any partial file a crash left behind."""
    for name in ("manifest.csv", "skipped.csv"):
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
    """The whole prepare step; writes manifest.csv (unless --strict stopped it) and skipped.csv under `out_root`.

    Defaults: CineMA's geometry and the label rule NOR = 0, every other code = 1.
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
    for result in _results(found.records, geometry, out_root, workers):
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
    write_skipped(out_root / "skipped.csv", problems)
    return PrepareResult(rows, problems, stopped=False)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (design.md contract plus geometry, workers and label overrides)."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__)
    parser.add_argument("--raw", type=Path, action="append", required=True, help="input folder (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="prepared root to write")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--strict", action="store_true", help="stop with exit 1 at the first bad subject")
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
    for problem in result.problems[:20]:
        print(f"skipped: {problem.path}: {problem.reason}", file=sys.stderr)
    if len(result.problems) > 20:
        print(f"... {len(result.problems) - 20} more in {args.out / 'skipped.csv'}", file=sys.stderr)
    if result.stopped:
        print("error: --strict: stopped at the first bad subject (see skipped.csv)", file=sys.stderr)
        return 1
    print(summary(result.rows, len(result.problems)))
    if not result.rows:
        print(f"error: no subject prepared from {', '.join(map(str, args.raw))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
