"""`python -m experiments.benchmark`: every method x seed as a resumable run, then results.csv, summary.md, plots."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.cohort import Cohort, assert_disjoint_from_standin, prepared, synthesized
from experiments.report import write_report
from experiments.runs import METHODS, RunSettings, run_method
from models import standin
from models.atomic_io import write_json_atomic, write_text_atomic
from models.config import ConvViTConfig
from models.standin import STANDIN, prepare_args

MARKER_NAME = "run_record.json"
"""Written atomically as the last step of a run: a run directory holding it is finished and is never redone."""
BENCHMARK_FILE = "benchmark.json"
CINEMA_FIELD_OF_VIEW_MM = 192.0


@dataclass(frozen=True)
class RunSpec:
    """The benchmark's unit of work: one method (or variant) with one seed."""

    method: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.method}__seed{self.seed}"


RunFunction = Callable[[RunSpec, Path], dict[str, Any]]
"""Runs one spec inside its (empty) run directory and returns its run record (docs/evaluation.md, "Run record")."""


class ConfigurationMismatch(RuntimeError):
    """The output directory holds runs made with another configuration: resuming would mix them."""


def check_configuration(out_dir: Path, configuration: Mapping[str, Any]) -> None:
    """Record the configuration in out_dir/benchmark.json, or check that it equals the one recorded there."""
    path = out_dir / BENCHMARK_FILE
    wanted = json.loads(json.dumps(configuration))
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != wanted:
            changed = sorted(key for key in set(recorded) | set(wanted) if recorded.get(key) != wanted.get(key))
            raise ConfigurationMismatch(
                f"{path}: this benchmark directory was started with another configuration (differs in "
                f"{', '.join(changed)}); resume with the same options or choose a new --out"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, wanted)


def read_record(run_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The finished run's record, or None when the run has not finished (no marker)."""
    marker = run_dir / MARKER_NAME
    if not marker.exists():
        return None
    record = json.loads(marker.read_text(encoding="utf-8"))
    if (record.get("method"), record.get("seed")) != (spec.method, spec.seed):
        raise ValueError(
            f"{marker}: fields method/seed are {record.get('method')!r}/{record.get('seed')!r}, "
            f"expected {spec.method!r}/{spec.seed!r}"
        )
    return record


@dataclass
class Progress:
    """Records of the finished runs, in spec order, and the runs that failed this time (with their error)."""

    records: list[dict[str, Any]]
    failed: list[tuple[RunSpec, str]]


def run_pending(
    specs: Sequence[RunSpec],
    out_dir: Path,
    run_function: RunFunction,
    log: Callable[[str], None] = print,
    keep_going: bool = False,
) -> Progress:
    """Run every spec that has no completion marker yet; finished runs are read back, never redone.

    A run directory without a marker is the leftover of an interrupted or failed run: it is wiped and the run starts
    again. With `keep_going`, a run that raises an Exception is logged (and its error kept in `error.txt`) and the
    next one starts; otherwise the exception propagates. An interruption (KeyboardInterrupt) always propagates.
    """
    progress = Progress(records=[], failed=[])
    for index, spec in enumerate(specs, start=1):
        run_dir = out_dir / "runs" / spec.run_id
        prefix = f"[{index}/{len(specs)}] {spec.method} seed {spec.seed}"
        record = read_record(run_dir, spec)
        if record is not None:
            log(f"{prefix}: finished earlier, skipped")
            progress.records.append(record)
            continue
        if run_dir.exists():
            log(f"{prefix}: removing the unfinished run left in {run_dir}")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        log(f"{prefix}: running")
        started = time.monotonic()
        try:
            record = dict(run_function(spec, run_dir))
        except Exception as error:
            if not keep_going:
                raise
            message = f"{type(error).__name__}: {error}"
            write_text_atomic(run_dir / "error.txt", message + "\n")
            log(f"{prefix}: FAILED ({message}); continuing")
            progress.failed.append((spec, message))
            continue
        record.update(method=spec.method, seed=spec.seed, wall_s=time.monotonic() - started)
        write_text_atomic(run_dir / MARKER_NAME, json.dumps(record, indent=1) + "\n")
        log(f"{prefix}: done in {record['wall_s']:.0f} s")
        progress.records.append(record)
    return progress


def log(message: str) -> None:
    """Progress lines, flushed at once so that they interleave correctly with the subprocesses' output."""
    print(message, flush=True)


def build_specs(methods: Sequence[str], seeds: Sequence[int]) -> list[RunSpec]:
    """Seed-major order, so that an interrupted benchmark already holds every method for its first seeds."""
    return [RunSpec(method, seed) for seed in seeds for method in methods]


def geometry_options(backbone: str) -> list[str]:
    """data_prep.prepare options for the backbone's input size, at CineMA's in-plane field of view (192 mm)."""
    x, y, z = ConvViTConfig.preset(backbone).image_size
    spacing = CINEMA_FIELD_OF_VIEW_MM / x
    return ["--crop", str(x), str(y), "--depth", str(z), "--spacing", f"{spacing:g}", f"{spacing:g}", "10"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="benchmark directory (created; resumed if it exists)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"methods and variants to run (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="each seed sets the split, the adapter initialisation and the data order (default 0 1 2)",
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--prepared", type=Path, help="use this prepared root for every seed (the split is then fixed)")
    data.add_argument("--raw", type=Path, help="raw cohort to prepare once per seed (default: synthesize one)")
    parser.add_argument("--cohort-seed", type=int, default=0, help="seed of the synthesized federated cohort")
    parser.add_argument(
        "--subjects-per-vendor",
        type=int,
        default=40,
        help="size of the synthesized cohort (40: 8 test subjects a site)",
    )
    parser.add_argument(
        "--weights",
        default=STANDIN,
        help="standin (default: the committed stand-in backbone), random, or a CineMA .safetensors path",
    )
    parser.add_argument("--backbone", default=None, help="ConvViT preset for --weights random or a bare checkpoint")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--simulator-threads", type=int, default=2, help="sites trained in parallel (threads)")
    return parser.parse_args(argv)


def run_configuration(args: argparse.Namespace) -> dict[str, Any]:
    """Every option a single run's result depends on; methods and seeds may change when resuming."""
    skipped = {"out", "methods", "seeds", "simulator_threads"}
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in skipped
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out_dir = args.out.resolve()
    try:
        check_configuration(out_dir, run_configuration(args))
    except ConfigurationMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    options = prepare_args() if args.weights == STANDIN else geometry_options(args.backbone or "micro")
    if args.prepared:
        prepared_roots = dict.fromkeys(args.seeds, args.prepared.resolve())
    else:
        cohort = Cohort(args.cohort_seed, args.subjects_per_vendor)
        raw = args.raw.resolve() if args.raw else synthesized(out_dir / "data" / "raw", cohort, log)
        prepared_roots = {
            seed: prepared(raw, out_dir / "data" / f"prepared_seed{seed}", seed, options, log, workers=1)
            for seed in args.seeds
        }
    if args.weights == STANDIN:
        for root in sorted(set(prepared_roots.values())):
            assert_disjoint_from_standin(root)
    settings = RunSettings(
        prepared_roots=prepared_roots,
        weights=args.weights,
        backbone=args.backbone,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        simulator_threads=args.simulator_threads,
        log=log,
    )
    specs = build_specs(args.methods, args.seeds)
    progress = run_pending(
        specs,
        out_dir,
        lambda spec, run_dir: run_method(METHODS[spec.method], settings, spec.seed, run_dir),
        log=log,
        keep_going=True,
    )
    header = summary_header(args, argv, progress)
    notes = {method: METHODS[method].description for method in args.methods}
    if progress.records:
        write_report(progress.records, out_dir, notes, header, log=log)
    for spec, message in progress.failed:
        print(f"failed: {spec.method} seed {spec.seed}: {message}", file=sys.stderr)
    return 1 if progress.failed else 0


def summary_header(args: argparse.Namespace, argv: Sequence[str] | None, progress: Progress) -> list[str]:
    """The first lines of summary.md: the command, the seeds, the settings and what the backbone is."""
    command = " ".join(["python -m experiments.benchmark", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# Methods compared",
        "",
        f"Command: `{command}`",
        "",
        f"Seeds: {' '.join(map(str, args.seeds))} (each sets the split, the adapter initialisation and the data "
        f"order; the cohort is fixed{' and so is the split: --prepared' if args.prepared else ''}).",
        f"Federation: {args.rounds} rounds x {args.local_epochs} local epoch(s), 4 sites, lr {args.lr}, "
        f"batch {args.batch_size}.",
    ]
    if args.weights == STANDIN:
        record = standin.read_record()
        probe = record["probe"]["standin"]
        lines.append(
            f"Backbone: the committed stand-in for CineMA, NOT CineMA (models/pretrained/standin, sha256 "
            f"{record['weights_sha256'][:12]}): `{record['settings']['preset']}` ConvViT pretrained on "
            f"{record['settings']['objective']} of a separate Siemens-only cohort; frozen-feature probe AUROC "
            f"{probe['auroc']:.3f}, pathology-group macro recall {probe['group_macro_recall']:.3f}."
        )
    else:
        lines.append(f"Backbone: `{args.weights}` ({args.backbone or 'its config'}).")
    for spec, message in progress.failed:
        lines.append(f"**Failed run, not in the tables**: {spec.method} seed {spec.seed}: {message}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
