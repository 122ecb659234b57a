"""The one cohort builder: synthesize a raw cohort, prepare its splits (each reused while its settings hold), and
check that a prepared cohort shares no subject with the stand-in's pretraining cohort."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.preprocess import read_volume, to_uint8
from data_prep.report import PREPARED_FILE, image_path, read_manifest
from models.atomic_io import write_json_atomic
from models.protocol import SITES
from models.standin import RECORD_NAME, STANDIN_DIR, read_record

STAMP_FILE = "cohort_settings.json"
"""Written last into a finished raw or prepared folder: the settings it was built with."""
Log = Callable[[str], None]


@dataclass(frozen=True)
class Cohort:
    """A synthetic cohort: who is in it (seed, size, vendors) and how it is rendered."""

    seed: int
    subjects_per_vendor: int
    vendors: tuple[str, ...] = SITES
    render_profile: str | None = None
    """Render every heart with this vendor's profile (the hearts are the same whatever the profile)."""


def _print(message: str) -> None:
    print(message, flush=True)


def _finished(folder: Path, settings: Mapping) -> bool:
    stamp = folder / STAMP_FILE
    return stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == dict(settings)


def _run_module(arguments: Sequence[str], log: Log) -> None:
    """`python -m <arguments>` with this interpreter, its command line logged first; a failure raises."""
    command = [sys.executable, "-m", *arguments]
    log("+ " + " ".join(command))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def synthesized(raw: Path, cohort: Cohort, log: Log = _print, workers: int = 2) -> Path:
    """The raw cohort in `raw` (data_prep.synthesize), written unless a finished one with these settings is there."""
    settings = {**asdict(cohort), "vendors": list(cohort.vendors)}
    if _finished(raw, settings):
        return raw
    shutil.rmtree(raw, ignore_errors=True)
    options = ["--vendors", *cohort.vendors] if tuple(cohort.vendors) != SITES else []
    options += ["--render-profile", cohort.render_profile] if cohort.render_profile else []
    arguments = [
        "--out",
        str(raw),
        "--seed",
        str(cohort.seed),
        "--subjects-per-vendor",
        str(cohort.subjects_per_vendor),
    ]
    _run_module(["data_prep.synthesize", *arguments, "--workers", str(workers), *options], log)
    write_json_atomic(raw / STAMP_FILE, settings)
    return raw


def prepared(
    raw: Path, out: Path, split_seed: int, options: Sequence[str], log: Log = _print, workers: int = 2
) -> Path:
    """The prepared root `out` of `raw` (data_prep.prepare with `options`: geometry, split fractions), split with
    `split_seed`; prepared unless a finished one from the same raw cohort and settings is there."""
    stamp = raw / STAMP_FILE
    raw_settings = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else {"raw_dir": str(raw)}
    settings = {"raw": raw_settings, "split_seed": split_seed, "options": list(options)}
    if _finished(out, settings) and (out / PREPARED_FILE).is_file():  # roots prepared before prepared.json: redo
        return out
    shutil.rmtree(out, ignore_errors=True)
    arguments = ["--raw", str(raw), "--out", str(out), "--seed", str(split_seed), "--workers", str(workers)]
    _run_module(["data_prep.prepare", *arguments, *options], log)
    write_json_atomic(out / STAMP_FILE, settings)
    return out


def build_cohort(folder: Path, cohort: Cohort, options: Sequence[str], log: Log = _print) -> Path:
    """`<folder>/raw` and `<folder>/prepared` (split with the cohort's seed); returns the prepared root."""
    raw = synthesized(folder / "raw", cohort, log)
    return prepared(raw, folder / "prepared", cohort.seed, options, log)


# ---- disjointness from the stand-in's pretraining cohort ----------------------------------------------------------


def volume_digests(root: Path) -> dict[str, str]:
    """sha256 of every subject's voxels as the data module holds them (uint8 of the [0, 1] volume), by subject id."""
    digests = {}
    for row in read_manifest(root / "manifest.csv"):
        voxels = to_uint8(read_volume(image_path(root / "manifest.csv", row)))
        digests[row["subject_id"]] = hashlib.sha256(voxels.tobytes()).hexdigest()
    return digests


def assert_disjoint_digests(ours: Mapping[str, str], root: Path, source: str) -> None:
    """Raise unless the prepared root `root` shares neither a subject id nor a volume with `ours` (from `source`)."""
    theirs = volume_digests(root)
    same_ids = sorted(set(ours) & set(theirs))
    if same_ids:
        raise ValueError(
            f"{source} and {root / 'manifest.csv'} share {len(same_ids)} subject id(s), e.g. {same_ids[:5]}: "
            "the pretraining cohort must be disjoint from every other cohort"
        )
    ours_by_digest = {digest: subject for subject, digest in ours.items()}
    same_volumes = sorted(ours_by_digest[digest] for digest in set(ours_by_digest) & set(theirs.values()))
    if same_volumes:
        raise ValueError(
            f"{source} and {root} hold {len(same_volumes)} identical volume(s) (e.g. {same_volumes[:5]}): "
            "the same subject is in both cohorts"
        )


def assert_disjoint(pretraining: Path, others: Sequence[Path], digests: Mapping[str, str] | None = None) -> dict:
    """Raise unless the pretraining cohort shares neither a subject id nor a volume with any other cohort
    (`digests`: the pretraining cohort's `volume_digests`, when already computed)."""
    ours = digests if digests is not None else volume_digests(pretraining)
    for root in others:
        assert_disjoint_digests(ours, root, str(pretraining))
    return {"pretraining_subjects": len(ours), "cohorts_checked": len(others)}


def assert_disjoint_from_standin(root: Path, standin: Path = STANDIN_DIR) -> None:
    """Raise if a (federated) prepared root holds a subject of the stand-in's pretraining cohort."""
    record = read_record(standin)
    assert_disjoint_digests(record["pretraining_volume_sha256"], root, f"{standin / RECORD_NAME}")
