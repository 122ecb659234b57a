"""What a prepare run reports besides the manifest: prepared.json, warnings about degenerate splits and absent sites,
and the NIfTI files no reader recognised (issue #12, real-data path)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest

from data_prep.prepare import main as prepare_main
from data_prep.prepare import run_prepare
from data_prep.preprocess import Geometry
from data_prep.readers import MISSING_PID_HINT, UNCOMPRESSED_HINT, UNRECOGNISED_REASON, discover
from data_prep.records import LabelRule
from data_prep.report import PREPARED_SCHEMA, read_manifest, read_prepared, split_warnings
from models.protocol import SITES

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--crop", "32", "32", "--spacing", "4", "4", "10", "--depth", "4", "--workers", "1"]
NOT_RECOGNISED = "not recognised as any supported layout"


@pytest.fixture(scope="module")
def frames(synthetic_raw: Path) -> tuple[Path, Path]:
    """ED and ES frames of one synthetic M&Ms-2 subject: the images of every hand-made CineMA-layout subject."""
    folder = sorted((synthetic_raw / "MnM2" / "dataset").iterdir())[0]
    return folder / f"{folder.name}_SA_ED.nii.gz", folder / f"{folder.name}_SA_ES.nii.gz"


def cinema_cohort(root: Path, frames: tuple[Path, Path], sites: Mapping[str, tuple[int, int]]) -> Path:
    """A CineMA-preprocessed folder with (healthy, diseased) subjects per site, all with the same frames."""
    root.mkdir(parents=True)
    lines = ["pid,pathology,vendor"]
    for site, (healthy, diseased) in sites.items():
        for number in range(healthy + diseased):
            pid = f"{site}{number:02d}"
            for frame, phase in zip(frames, ("ed", "es"), strict=True):
                shutil.copy(frame, root / f"{pid}_sax_{phase}.nii.gz")
            lines.append(f"{pid},{'NOR' if number < healthy else 'HCM'},{site.upper()}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`data_prep.prepare.main(argv)` in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = prepare_main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def unrecognised_rows(out: Path) -> dict[str, str]:
    """path → reason of the skipped.csv rows that are unrecognised files."""
    return {
        row["path"]: row["reason"] for row in read_manifest(out / "skipped.csv") if NOT_RECOGNISED in row["reason"]
    }


# ---- prepared.json ----------------------------------------------------------------------------------------------


def test_prepared_json_of_the_synthetic_cohort(prepared_root: Path) -> None:
    """conftest's run_prepare: the geometry it was given, the default settings and the manifest's counts."""
    record = read_prepared(prepared_root)
    assert record["schema"] == PREPARED_SCHEMA
    assert record["geometry"] == {"crop": [64, 64], "spacing_mm": [3.0, 3.0, 10.0], "depth": 8}  # TEST_GEOMETRY
    assert (record["seed"], record["val_fraction"], record["test_fraction"], record["label_rule"]) == (0, 0.2, 0.2, {})
    rows = read_manifest(prepared_root / "manifest.csv")
    for client in SITES:
        ours = [row for row in rows if row["client"] == client]
        expected = Counter(row["split"] for row in ours)
        healthy = Counter(row["split"] for row in ours if row["label"] == "0")
        counts = record["counts"][client]
        assert {split: counts[split] for split in ("train", "val", "test")} == expected
        assert counts["healthy"] == {split: healthy[split] for split in ("train", "val", "test")}
    # 6 subjects a site: every site's val and test splits are too small to report a figure.
    too_few = {warning.split(":")[0] for warning in record["warnings"] if "too few to report a figure" in warning}
    assert too_few == {f"site {site}" for site in SITES}


ARGUMENT_CASES = {
    "stand-in geometry, defaults": (
        ["--crop", "32", "32", "--spacing", "4", "4", "10", "--depth", "4"],
        {"crop": [32, 32], "spacing_mm": [4.0, 4.0, 10.0], "depth": 4},
        (0, 0.2, 0.2, {}),
    ),
    "every setting changed": (
        ["--crop", "24", "40", "--spacing", "5", "4.5", "12", "--depth", "3", "--seed", "7"]
        + ["--val-fraction", "0.3", "--test-fraction", "0.1", "--label-override", "AHS=0", "--label-override", "LV=0"],
        {"crop": [24, 40], "spacing_mm": [5.0, 4.5, 12.0], "depth": 3},
        (7, 0.3, 0.1, {"AHS": 0, "LV": 0}),
    ),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_CASES))
def test_prepared_json_records_the_command_line(frames, tmp_path: Path, case: str) -> None:
    arguments, geometry, settings = ARGUMENT_CASES[case]
    raw = cinema_cohort(tmp_path / "raw", frames, {"siemens": (1, 2)})
    code, _, _ = run_main(["--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "1", *arguments])
    record = read_prepared(tmp_path / "out")
    assert code == 0 and record["geometry"] == geometry
    assert (record["seed"], record["val_fraction"], record["test_fraction"], record["label_rule"]) == settings
    assert sum(record["counts"]["siemens"][split] for split in ("train", "val", "test")) == 3


def _valid_prepared() -> dict:
    return {
        "schema": PREPARED_SCHEMA,
        "geometry": {"crop": [64, 64], "spacing_mm": [3.0, 3.0, 10.0], "depth": 8},
        "seed": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "label_rule": {},
        "counts": {},
        "warnings": [],
    }


_DELETE = object()


def _edited(*keys: str, value: object = _DELETE) -> str:
    """A valid prepared.json as text with the field at `keys` set to `value` (deleted by default)."""
    record = _valid_prepared()
    *parents, last = keys
    target = record
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return json.dumps(record)


READ_ERRORS: dict[str, tuple[str | None, type[Exception], str]] = {
    "missing file": (None, FileNotFoundError, "prepared.json: missing"),
    "not JSON": ("{not json", ValueError, "prepared.json: unreadable JSON"),
    "missing top-level field": (_edited("geometry"), ValueError, "missing field geometry"),
    "missing warnings": (_edited("warnings"), ValueError, "missing field warnings"),
    "missing geometry field": (_edited("geometry", "spacing_mm"), ValueError, "missing field geometry.spacing_mm"),
    "other schema": (_edited("schema", value="other/9"), ValueError, "field schema is 'other/9'"),
    "crop of one value": (_edited("geometry", "crop", value=[64]), ValueError, "field geometry.crop is [64]"),
    "depth zero": (_edited("geometry", "depth", value=0), ValueError, "field geometry.depth is 0"),
    "geometry not an object": (_edited("geometry", value=[1]), ValueError, "field geometry is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(READ_ERRORS))
def test_read_prepared_names_the_file_and_the_field(tmp_path: Path, case: str) -> None:
    text, error, message = READ_ERRORS[case]
    if text is not None:
        (tmp_path / "prepared.json").write_text(text, encoding="utf-8")
    with pytest.raises(error) as raised:
        read_prepared(tmp_path)
    assert str(tmp_path / "prepared.json") in str(raised.value) and message in str(raised.value)


def test_read_prepared_returns_a_valid_record(tmp_path: Path) -> None:
    (tmp_path / "prepared.json").write_text(json.dumps(_valid_prepared()), encoding="utf-8")
    assert read_prepared(tmp_path) == _valid_prepared()


# ---- warnings ---------------------------------------------------------------------------------------------------


def _site(train: int, val: int, test: int, healthy_train: int) -> dict:
    return {"train": train, "val": val, "test": test, "healthy": {"train": healthy_train, "val": 0, "test": 0}}


USABLE = _site(train=10, val=5, test=5, healthy_train=4)
WARNING_CASES: dict[str, tuple[dict, list[str]]] = {
    "every site usable": ({}, []),
    "no val subjects": (
        {"ge": _site(10, 0, 5, 4)},
        ["site ge: no val subjects"],
    ),
    "no test subjects": (
        {"ge": _site(10, 5, 0, 4)},
        ["site ge: no test subjects"],
    ),
    "too few val subjects": (
        {"philips": _site(10, 4, 5, 4)},
        ["site philips: 4 val subject(s), too few to report a figure (fewer than 5)"],
    ),
    "too few test subjects": (
        {"canon": _site(10, 5, 1, 4)},
        ["site canon: 1 test subject(s), too few to report a figure (fewer than 5)"],
    ),
    "one training subject": (
        {"siemens": _site(1, 5, 5, 0)},
        ["site siemens: 1 training subject(s), fewer than 2"],
    ),
    "training subjects all diseased": (
        {"siemens": _site(10, 5, 5, 0)},
        ["site siemens: all 10 training subjects are diseased (label 1): a single class"],
    ),
    "training subjects all healthy": (
        {"ge": _site(3, 5, 5, 3)},
        ["site ge: all 3 training subjects are healthy (label 0): a single class"],
    ),
    "absent site": (
        {"canon": None},
        ["site canon: no subject prepared; it cannot join a federated run"],
    ),
}


@pytest.mark.parametrize("case", sorted(WARNING_CASES))
def test_split_warnings(case: str) -> None:
    changes, expected = WARNING_CASES[case]
    counts = {site: copy.deepcopy(USABLE) for site in SITES}
    for site, count in changes.items():
        if count is None:
            del counts[site]
        else:
            counts[site] = count
    assert split_warnings(counts) == expected


MISSING_SITES_COHORT = {"siemens": (7, 7), "philips": (1, 2)}
MISSING_SITES_WARNINGS = [
    "site philips: 1 val subject(s), too few to report a figure (fewer than 5)",
    "site philips: 1 test subject(s), too few to report a figure (fewer than 5)",
    "site philips: 1 training subject(s), fewer than 2",
    "site ge: no subject prepared; it cannot join a federated run",
    "site canon: no subject prepared; it cannot join a federated run",
]


def test_cli_warns_about_absent_sites_and_small_splits(frames, tmp_path: Path) -> None:
    """The path users run (`python -m data_prep.prepare`): warnings on stderr and in prepared.json, exit 0."""
    raw = cinema_cohort(tmp_path / "raw", frames, MISSING_SITES_COHORT)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep.prepare", "--raw", str(raw), "--out", str(out), *SMALL]
    command += ["--val-fraction", "0.4", "--test-fraction", "0.4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = [line.removeprefix("warning: ") for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert printed == MISSING_SITES_WARNINGS
    assert read_prepared(out)["warnings"] == MISSING_SITES_WARNINGS
    assert f"prepared 17 subjects, skipped 0, warnings {len(MISSING_SITES_WARNINGS)}" in done.stdout


def test_run_prepare_returns_the_warnings(frames, tmp_path: Path) -> None:
    raw = cinema_cohort(tmp_path / "raw", frames, {"ge": (1, 2)})
    result = run_prepare([raw], tmp_path / "out", seed=0, geometry=Geometry((32, 32), (4.0, 4.0, 10.0), 4))
    absent = "no subject prepared; it cannot join a federated run"
    assert result.warnings == [
        f"site siemens: {absent}",
        f"site philips: {absent}",
        "site ge: 1 val subject(s), too few to report a figure (fewer than 5)",
        "site ge: 1 test subject(s), too few to report a figure (fewer than 5)",
        "site ge: 1 training subject(s), fewer than 2",
        f"site canon: {absent}",
    ]
    assert read_prepared(tmp_path / "out")["warnings"] == result.warnings


# ---- unrecognised files -----------------------------------------------------------------------------------------


def test_no_file_of_the_synthetic_cohort_is_unrecognised(synthetic_raw: Path) -> None:
    """Every file of the real layouts (ACDC 4D cine, M&Ms-1 `_sa_gt`, M&Ms-2 `LA_*` and `SA_CINE`) is a subject's."""
    assert discover([synthetic_raw], LabelRule()).unrecognised == []


def test_synthetic_cohort_skips_nothing(prepared_root: Path) -> None:
    assert read_manifest(prepared_root / "skipped.csv") == []


STRAY_FILES: dict[str, str] = {
    "stray.nii.gz": UNRECOGNISED_REASON,
    "notes/scan.nii": UNRECOGNISED_REASON + UNCOMPRESSED_HINT,
    "cinema/other09_sax_es.nii.gz": UNRECOGNISED_REASON,  # an ES frame without its ED frame
    "cinema/ge00_sax_ed.nii": UNRECOGNISED_REASON + UNCOMPRESSED_HINT,  # beside a subject, but not gzip-compressed
    "misc/patient002_frame01.nii.gz": UNRECOGNISED_REASON,  # an ACDC name outside its patient folder
    "misc/A1B2C3_sa.nii.gz": UNRECOGNISED_REASON,  # an M&Ms-1 name outside its subject folder
    "misc/Subject 7.NII.GZ": UNRECOGNISED_REASON,
    "examples/sax_es.nii.gz": UNRECOGNISED_REASON + MISSING_PID_HINT,  # a CineMA file without its subject id
}
BELONGING_FILES = ("cinema/ge00_sax_t.nii.gz", "cinema/ge00_lax_4c.nii.gz")
"""Extra files of a recognised CineMA subject (full cine, long-axis view): never listed."""


@pytest.fixture(scope="module")
def stray_run(synthetic_raw: Path, frames, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path, Path]:
    """A raw root with 3 good CineMA subjects, their extra files, an ACDC folder without Info.cfg and STRAY_FILES;
    prepared once through `main`: (exit status, stderr, raw root, out)."""
    base = tmp_path_factory.mktemp("stray")
    raw, out = base / "raw", base / "out"
    cinema_cohort(raw / "cinema", frames, {"ge": (1, 2)})
    for name in [*STRAY_FILES, *BELONGING_FILES]:
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(frames[0], raw / name)
    acdc = sorted((synthetic_raw / "ACDC" / "database" / "training").iterdir())[0]
    shutil.copytree(acdc, raw / "acdc" / acdc.name)
    (raw / "acdc" / acdc.name / "Info.cfg").unlink()
    code, _, stderr = run_main(["--raw", str(raw), "--out", str(out), *SMALL])
    return code, stderr, raw, out


@pytest.mark.parametrize("name", sorted(STRAY_FILES))
def test_unrecognised_file_is_listed_with_its_reason(stray_run, name: str) -> None:
    code, stderr, raw, out = stray_run
    listed = unrecognised_rows(out)
    assert code == 0 and listed.get(str(raw / name)) == STRAY_FILES[name]
    assert f"skipped: {raw / name}: {NOT_RECOGNISED}" in stderr


def test_only_unrecognised_files_are_listed(stray_run) -> None:
    """Files of prepared subjects and of a skipped subject (ACDC folder without Info.cfg) are not listed."""
    _, _, raw, out = stray_run
    assert set(unrecognised_rows(out)) == {str(raw / name) for name in STRAY_FILES}
    others = [row for row in read_manifest(out / "skipped.csv") if NOT_RECOGNISED not in row["reason"]]
    assert len(others) == 1 and "image without metadata" in others[0]["reason"]
    assert len(read_manifest(out / "manifest.csv")) == 3


def test_unrecognised_files_do_not_stop_a_strict_run(frames, tmp_path: Path) -> None:
    raw = cinema_cohort(tmp_path / "raw", frames, {"siemens": (1, 2)})
    shutil.copy(frames[0], raw / "stray.nii.gz")
    code, _, _ = run_main(["--raw", str(raw), "--out", str(tmp_path / "out"), "--strict", *SMALL])
    assert code == 0 and set(unrecognised_rows(tmp_path / "out")) == {str(raw / "stray.nii.gz")}
    assert len(read_manifest(tmp_path / "out" / "manifest.csv")) == 3


NO_SUBJECT_CASES: dict[str, tuple[tuple[str, ...], str]] = {
    "only unrecognised NIfTI files": (
        ("a.nii.gz", "deep/b.nii"),
        "input(s) skipped, each with its reason in {out}/skipped.csv",
    ),
    "no NIfTI file at all": (("notes.txt",), 'no .nii.gz / .nii file found under it (see README "Input layouts")'),
}


@pytest.mark.parametrize("case", sorted(NO_SUBJECT_CASES))
def test_no_subject_message_points_to_the_skipped_list(frames, tmp_path: Path, case: str) -> None:
    names, message = NO_SUBJECT_CASES[case]
    raw, out = tmp_path / "raw", tmp_path / "out"
    for name in names:
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(frames[0], raw / name)
    code, stdout, stderr = run_main(["--raw", str(raw), "--out", str(out), *SMALL])
    nifti = [name for name in names if ".nii" in name]
    assert code == 1 and f"error: no subject prepared from {raw}: " in stderr
    assert message.format(out=out) in stderr and (f"{len(nifti)} input(s)" in stderr) == bool(nifti)
    assert set(unrecognised_rows(out)) == {str(raw / name) for name in nifti}
    assert f"prepared 0 subjects, skipped {len(nifti)}, warnings {len(SITES)}" in stdout
