"""Bad inputs: each case gets a reason naming the file (and field), a skipped.csv row, and exit 1 under --strict."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import data_prep.nifti as nifti
from data_prep.prepare import main as prepare_main
from data_prep.report import read_manifest

SMALL = ["--crop", "32", "32", "--depth", "4", "--spacing", "4", "4", "10", "--workers", "1"]


def _prepare(root: Path, out: Path, *extra: str) -> tuple[int, list[dict[str, str]]]:
    code = prepare_main(["--raw", str(root), "--out", str(out), *SMALL, *extra])
    return code, read_manifest(out / "skipped.csv")


def _edit_info(folder: Path, key: str, value: str | None) -> None:
    lines = [line for line in (folder / "Info.cfg").read_text().splitlines() if not line.startswith(f"{key}:")]
    if value is not None:
        lines.append(f"{key}: {value}")
    (folder / "Info.cfg").write_text("\n".join(lines) + "\n")


def _info_value(folder: Path, key: str) -> str:
    return next(line.split(": ")[1] for line in (folder / "Info.cfg").read_text().splitlines() if line.startswith(key))


def _ed_frame(folder: Path) -> Path:
    return folder / f"{folder.name}_frame{int(_info_value(folder, 'ED')):02d}.nii.gz"


def _replace_image(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, nib.load(path).affine), path)


def _truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def _set_csv_field(csv_path: Path, column: str, value: str) -> None:
    header, row, *rest = csv_path.read_text().splitlines()
    fields = row.split(",")
    fields[header.split(",").index(column)] = value
    csv_path.write_text("\n".join([header, ",".join(fields), *rest]) + "\n")


ACDC_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing Info.cfg field": (lambda f: (_edit_info(f, "ES", None), f / "Info.cfg")[1], "missing or empty field ES"),
    "garbled Info.cfg value": (
        lambda f: (_edit_info(f, "ED", "one"), f / "Info.cfg")[1],
        "field ED is not an integer",
    ),
    "garbled Info.cfg line": (
        lambda f: ((f / "Info.cfg").write_text("ED 1\n" + (f / "Info.cfg").read_text()), f / "Info.cfg")[1],
        "garbled line 1",
    ),
    "ED equals ES": (
        lambda f: (_edit_info(f, "ES", _info_value(f, "ED")), f / "Info.cfg")[1],
        "ED equals ES",
    ),
    "frame out of range": (lambda f: (_edit_info(f, "ES", "99"), f / "Info.cfg")[1], "field ES = 99 out of range"),
    "unknown pathology code": (
        lambda f: (_edit_info(f, "Group", "XYZ"), f / "Info.cfg")[1],
        "unknown pathology code 'XYZ' in field Group",
    ),
    "truncated nii.gz": (lambda f: (_truncate(_ed_frame(f)), _ed_frame(f))[1], "unreadable or truncated NIfTI"),
    "corrupt nii.gz": (
        lambda f: (_ed_frame(f).write_bytes(b"\x1f\x8bnot really gzip" * 40), _ed_frame(f))[1],
        "unreadable or truncated NIfTI",
    ),
    "NaN image": (
        lambda f: (_replace_image(_ed_frame(f), np.full((20, 20, 5), np.nan, np.float32)), _ed_frame(f))[1],
        "NaN",
    ),
    "constant image": (
        lambda f: (_replace_image(_ed_frame(f), np.full((20, 20, 5), 7, np.int16)), _ed_frame(f))[1],
        "constant",
    ),
    "wrong number of dimensions": (
        lambda f: (_replace_image(_ed_frame(f), np.ones((20, 20), np.int16)), _ed_frame(f))[1],
        "expected a 3D image",
    ),
    "image without Info.cfg": (
        lambda f: ((f / "Info.cfg").unlink(), f / f"{f.name}_4d.nii.gz")[1],
        "image without metadata",
    ),
}


@pytest.mark.parametrize("case", sorted(ACDC_CASES))
def test_acdc_bad_input_is_reported(one_subject, tmp_path: Path, case: str) -> None:
    root, folder, _ = one_subject("acdc")
    mutate, reason = ACDC_CASES[case]
    bad_path = mutate(folder)
    code, skipped = _prepare(root, tmp_path / "out", "--strict")
    assert code == 1 and not (tmp_path / "out" / "manifest.csv").exists()
    assert len(skipped) == 1 and skipped[0]["path"] == str(bad_path) and reason in skipped[0]["reason"]


def test_mnms_frame_out_of_range_names_file_and_field(one_subject, tmp_path: Path) -> None:
    root, folder, csv_path = one_subject("mnms")
    _set_csv_field(csv_path, "ES", "99")
    code, skipped = _prepare(root, tmp_path / "out", "--strict")
    assert code == 1 and skipped[0]["path"] == str(folder / f"{folder.name}_sa.nii.gz")
    assert "frame index 99 out of range" in skipped[0]["reason"] and "field ES of" in skipped[0]["reason"]


def test_mnms_ed_equal_es_and_unknown_code(one_subject, tmp_path: Path) -> None:
    root, _, csv_path = one_subject("mnms")
    _set_csv_field(csv_path, "ES", csv_path.read_text().splitlines()[1].split(",")[5])
    _, skipped = _prepare(root, tmp_path / "out1")
    assert skipped[0]["path"] == str(csv_path) and "ED equals ES" in skipped[0]["reason"]
    _set_csv_field(csv_path, "ES", "1" if csv_path.read_text().splitlines()[1].split(",")[5] != "1" else "2")
    _set_csv_field(csv_path, "Pathology", "Healthy")
    _, skipped = _prepare(root, tmp_path / "out2")
    assert "unknown pathology code 'Healthy' in field Pathology" in skipped[0]["reason"]


def test_mnms_3d_cine_is_a_dimension_error(one_subject, tmp_path: Path) -> None:
    root, folder, _ = one_subject("mnms")
    image = folder / f"{folder.name}_sa.nii.gz"
    _replace_image(image, np.asanyarray(nib.load(image).dataobj)[..., 0])
    _, skipped = _prepare(root, tmp_path / "out")
    assert skipped[0]["path"] == str(image) and "expected a 4D image" in skipped[0]["reason"]


@pytest.mark.parametrize("dataset", ["mnms", "mnms2"])
def test_csv_row_without_image_and_image_without_row(one_subject, tmp_path: Path, dataset: str) -> None:
    root, folder, csv_path = one_subject(dataset)
    header, row = csv_path.read_text().splitlines()[:2]
    key_column = 1 if dataset == "mnms" else 0
    ghost_row = row.split(",")
    ghost_row[key_column] = "Z9Z9Z9" if dataset == "mnms" else "359"
    csv_path.write_text(f"{header}\n{row}\n{','.join(ghost_row)}\n")
    stray_id = "Y8Y8Y8" if dataset == "mnms" else "358"
    stray = folder.parent / stray_id
    shutil.copytree(folder, stray)
    for path in stray.iterdir():
        path.rename(stray / path.name.replace(folder.name, stray_id))
    code, skipped = _prepare(root, tmp_path / "out")
    reasons = {row["path"]: row["reason"] for row in skipped}
    assert code == 0 and len(read_manifest(tmp_path / "out" / "manifest.csv")) == 1
    assert "CSV row" in reasons[str(csv_path)] and "has no image" in reasons[str(csv_path)]
    stray_image = next(p for p in stray.iterdir() if p.name.endswith(("_sa.nii.gz", "_SA_ED.nii.gz")))
    assert "image without a CSV row" in reasons[str(stray_image)]


def test_without_strict_bad_subjects_are_skipped_and_others_prepared(one_subject, tmp_path: Path) -> None:
    good_root, _, _ = one_subject("mnms2")
    bad_root, bad_folder, _ = one_subject("acdc")
    _edit_info(bad_folder, "Group", "XYZ")
    combined = tmp_path / "combined"
    shutil.copytree(good_root, combined / "good")
    shutil.copytree(bad_root, combined / "bad")
    code, skipped = _prepare(combined, tmp_path / "out")
    assert code == 0 and len(read_manifest(tmp_path / "out" / "manifest.csv")) == 1
    assert len(skipped) == 1 and skipped[0]["path"].endswith("Info.cfg")
    code, _ = _prepare(combined, tmp_path / "strict", "--strict")
    assert code == 1


def test_atomic_write_leaves_no_valid_looking_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash_midway(image: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"\x1f\x8b half a volume")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", crash_midway)
    target = tmp_path / "volumes" / "subject.nii.gz"
    with pytest.raises(OSError, match="disk full"):
        nifti.save_atomic(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), target)
    assert not target.exists() and not list(target.parent.iterdir())


def test_leftover_partial_files_are_removed_by_the_next_run(one_subject, tmp_path: Path) -> None:
    root, _, _ = one_subject("mnms2")
    leftover = tmp_path / "out" / "volumes" / "siemens" / f".mnms2_001.123{nifti.PARTIAL_SUFFIX}"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    code, _ = _prepare(root, tmp_path / "out")
    assert code == 0 and not leftover.exists()


def test_missing_raw_folder_is_a_usage_error(tmp_path: Path) -> None:
    assert prepare_main(["--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
