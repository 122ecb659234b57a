"""Bad inputs: each case gets a reason naming the file (and field), a skipped.csv row, and exit 1 under --strict.

Every case runs with one worker (in-process) and with two worker processes (the reasons cross a process boundary).
Each test is cut by a deadline, so a hung worker pool is a failure, not a stuck test run.
"""

from __future__ import annotations

import gzip
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import data_prep.nifti as nifti
from data_prep.prepare import main as prepare_main
from data_prep.report import read_manifest

SMALL = ["--crop", "32", "32", "--depth", "4", "--spacing", "4", "4", "10"]
DEADLINE_S = 120
NIFTI1_HEADER_SIZE, PIXDIM_OFFSET = 348, 76


@contextmanager
def fail_after(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds`: a hang becomes a failure (pytest-timeout is absent)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: probably hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """Fail a test still running after DEADLINE_S seconds (e.g. a worker pool that never returns)."""
    with fail_after(DEADLINE_S):
        yield


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def workers(request: pytest.FixtureRequest) -> int:
    """Run with one worker (in-process) and with two worker processes."""
    return request.param


def _prepare(root: Path, out: Path, *extra: str, workers: int = 1) -> tuple[int, list[dict[str, str]]]:
    code = prepare_main(["--raw", str(root), "--out", str(out), *SMALL, "--workers", str(workers), *extra])
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


def _es_frame(folder: Path) -> Path:
    return folder / f"{folder.name}_frame{int(_info_value(folder, 'ES')):02d}.nii.gz"


def _ed_label(folder: Path) -> Path:
    return _ed_frame(folder).with_name(_ed_frame(folder).name.replace(".nii.gz", "_gt.nii.gz"))


def _replace_image(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data, nib.load(path).affine if affine is None else affine), path)


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
def test_acdc_bad_input_is_reported(one_subject, tmp_path: Path, case: str, workers: int) -> None:
    root, folder, _ = one_subject("acdc")
    mutate, reason = ACDC_CASES[case]
    bad_path = mutate(folder)
    code, skipped = _prepare(root, tmp_path / "out", "--strict", workers=workers)
    assert code == 1 and not (tmp_path / "out" / "manifest.csv").exists()
    assert len(skipped) == 1 and skipped[0]["path"] == str(bad_path) and reason in skipped[0]["reason"]


# ---- every other corruption class the code detects, per layout ----------------------------------------------------


def _cinema_subject(one_subject: Callable, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CineMA-preprocessed root made from the M&Ms-2 subject: train/p001/p001_sax_{ed,es}.nii.gz plus a CSV."""
    _, source, _ = one_subject("mnms2")
    root = tmp_path / "cinema"
    folder = root / "train" / "p001"
    folder.mkdir(parents=True)
    for phase in ("ED", "ES"):
        shutil.copy(source / f"{source.name}_SA_{phase}.nii.gz", folder / f"p001_sax_{phase.lower()}.nii.gz")
    csv_path = root / "train_metadata.csv"
    csv_path.write_text("pid,pathology,vendor\np001,NOR,SIEMENS\n")
    return root, folder, csv_path


def _subject(one_subject: Callable, tmp_path: Path, dataset: str) -> tuple[Path, Path, Path]:
    """(raw root, subject folder, metadata file) of one good subject of `dataset` (acdc, mnms, mnms2 or cinema)."""
    return _cinema_subject(one_subject, tmp_path) if dataset == "cinema" else one_subject(dataset)


def _mnms2_file(folder: Path, kind: str) -> Path:
    return folder / f"{folder.name}_SA_{kind}.nii.gz"


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _delete(path: Path) -> Path:
    path.unlink()
    return path


def _link_loop(path: Path) -> Path:
    """Replace `path` by a symbolic link to a sibling that links back to it."""
    partner = path.with_name("loop_partner.nii.gz")
    path.unlink()
    path.symlink_to(partner.name)
    partner.symlink_to(path.name)
    return path


def _dangling_link(path: Path) -> Path:
    path.unlink()
    path.symlink_to("no_such_file.nii.gz")
    return path


def _with_label_value(path: Path, value: int) -> Path:
    data = _data(path).copy()
    data[0, 0, 0] = value
    _replace_image(path, data)
    return path


def _shrunk(path: Path) -> Path:
    _replace_image(path, _data(path)[:-2])
    return path


def _shifted(path: Path, offset: float = 5.0) -> Path:
    """Same voxels, geometry moved `offset` mm along x (5 mm: as if from another acquisition)."""
    affine = nib.load(path).affine.copy()
    affine[0, 3] += offset
    _replace_image(path, _data(path), affine)
    return path


def _single_column(folder: Path) -> Path:
    """ED and ES frames of one voxel column (x extent 1): not a short-axis stack."""
    for frame in (_ed_frame(folder), _es_frame(folder)):
        _replace_image(frame, np.arange(100, dtype=np.int16).reshape(1, 20, 5))
    return _ed_frame(folder)


def _dark_except_corner(path: Path) -> Path:
    """Zero everywhere but one corner voxel: not constant, yet constant inside a crop around the heart."""
    data = np.zeros(nib.load(path).shape, dtype=np.int16)
    data[0, 0, 0] = 100
    _replace_image(path, data)
    return path


def _as_dtype(path: Path, dtype: np.dtype) -> Path:
    data = _data(path)
    if dtype.fields is not None:
        converted = np.zeros(data.shape, dtype=dtype)
        converted["R"] = np.clip(data, 0, 255)
    else:
        converted = (data + 1j * data).astype(dtype)
    _replace_image(path, converted)
    return path


def _patch_pixdim(path: Path, axis: int, value: float) -> Path:
    """Store `value` in pixdim[axis] byte for byte (nibabel turns 0 into 1 and negatives positive when saving)."""
    header = bytearray(gzip.decompress(path.read_bytes()))
    assert struct.unpack("<i", header[:4])[0] == NIFTI1_HEADER_SIZE, "expected a little-endian NIfTI-1 file"
    offset = PIXDIM_OFFSET + 4 * axis
    header[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(header)))
    return path


def _degenerate_affine(path: Path) -> Path:
    """Second voxel axis parallel to the first: positive lengths, but no volume (singular sform)."""
    affine = nib.load(path).affine.copy()
    affine[:3, 1] = affine[:3, 0]
    _replace_image(path, _data(path), affine)
    return path


def _bad_bytes(path: Path) -> Path:
    path.write_bytes(path.read_bytes() + b"\xff\xfe\xfa not UTF-8\n")
    return path


def _set_field(column: str, value: str) -> Callable[[Path, Path], Path]:
    def mutate(folder: Path, csv_path: Path) -> Path:
        _set_csv_field(csv_path, column, value)
        return csv_path

    return mutate


def _set_fields(values: dict[str, str]) -> Callable[[Path, Path], Path]:
    def mutate(folder: Path, csv_path: Path) -> Path:
        for column, value in values.items():
            _set_csv_field(csv_path, column, value)
        return csv_path

    return mutate


Mutation = Callable[[Path, Path], Path]
"""Breaks a good subject given (subject folder, metadata file); returns the file skipped.csv must name."""
CASES: dict[str, tuple[str, Mutation, str]] = {
    "missing frame file": ("mnms2", lambda f, m: _delete(_mnms2_file(f, "ES")), "file is missing"),
    "dangling symbolic link": ("mnms2", lambda f, m: _dangling_link(_mnms2_file(f, "ES")), "dangling symbolic link"),
    "symbolic link loop": ("acdc", lambda f, m: _link_loop(_ed_frame(f)), "symbolic link loop"),
    "label outside 0-3": ("acdc", lambda f, m: _with_label_value(_ed_label(f), 7), "has values [7] outside 0-3"),
    "ES shape differs from ED": ("mnms2", lambda f, m: _shrunk(_mnms2_file(f, "ES")), "differs from ED shape"),
    "label shape differs from image": ("acdc", lambda f, m: _shrunk(_ed_label(f)), "label shape"),
    "ES geometry differs from ED": ("mnms2", lambda f, m: _shifted(_mnms2_file(f, "ES")), "affine (voxel-to-world"),
    "label geometry differs from image": ("acdc", lambda f, m: _shifted(_ed_label(f)), "affine (voxel-to-world"),
    "not a short-axis stack": ("acdc", lambda f, m: _single_column(f), "is not a short-axis stack"),
    "no contrast in the ED crop": (
        "acdc",
        lambda f, m: _dark_except_corner(_ed_frame(f)),
        "constant inside the crop window",
    ),
    "no contrast in the ES crop": (
        "acdc",
        lambda f, m: _dark_except_corner(_es_frame(f)),
        "constant inside the crop window",
    ),
    "pixdim zero": ("acdc", lambda f, m: _patch_pixdim(_ed_frame(f), 1, 0.0), "header field pixdim[1] = 0.0"),
    "pixdim negative": ("acdc", lambda f, m: _patch_pixdim(_ed_frame(f), 3, -10.0), "header field pixdim[3] = -10.0"),
    "pixdim NaN": (
        "mnms2",
        lambda f, m: _patch_pixdim(_mnms2_file(f, "ED"), 2, np.nan),
        "header field pixdim[2] = nan",
    ),
    "non-finite affine": (
        "mnms2",
        lambda f, m: _shifted(_mnms2_file(f, "ED"), np.inf),
        "affine from header field sform (srow_x/srow_y/srow_z) has non-finite values",
    ),
    "degenerate affine": (
        "acdc",
        lambda f, m: _degenerate_affine(_ed_frame(f)),
        "affine from header field sform (srow_x/srow_y/srow_z) is degenerate",
    ),
    "complex image": ("acdc", lambda f, m: _as_dtype(_ed_frame(f), np.dtype(np.complex64)), "datatype = 32"),
    "RGB image": (
        "mnms2",
        lambda f, m: _as_dtype(_mnms2_file(f, "ES"), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])),
        "datatype = 128",
    ),
    "unknown M&Ms vendor": (
        "mnms",
        _set_fields({"Vendor": "Z", "VendorName": "Acme"}),
        "unknown vendor (field Vendor 'Z', VendorName 'Acme')",
    ),
    "unknown M&Ms-2 vendor": ("mnms2", _set_field("VENDOR", "ACME"), "unknown vendor 'ACME' in field VENDOR"),
    "unknown CineMA CSV vendor": ("cinema", _set_field("vendor", "ACME"), "unknown vendor 'ACME' in field vendor"),
    "unreadable Info.cfg": ("acdc", lambda f, m: _bad_bytes(m), "unreadable Info.cfg (UnicodeDecodeError"),
    "unreadable M&Ms CSV": ("mnms", lambda f, m: _bad_bytes(m), "unreadable CSV (UnicodeDecodeError"),
    "unreadable M&Ms-2 CSV": ("mnms2", lambda f, m: _bad_bytes(m), "unreadable CSV (UnicodeDecodeError"),
    "M&Ms row without subject code": (
        "mnms",
        _set_field("External code", ""),
        "row without a value in field 'External code'",
    ),
    "M&Ms-2 row without subject code": (
        "mnms2",
        _set_field("SUBJECT_CODE", ""),
        "row without a value in field 'SUBJECT_CODE'",
    ),
    "CineMA row without subject code": ("cinema", _set_field("pid", ""), "row without a value in field 'pid'"),
}


@pytest.mark.parametrize("dataset", ["acdc", "mnms", "mnms2", "cinema"])
def test_unmodified_subjects_are_prepared(one_subject, tmp_path: Path, dataset: str) -> None:
    """The control for CASES: each unmodified subject prepares cleanly, so a case fails by its mutation alone."""
    root, _, _ = _subject(one_subject, tmp_path, dataset)
    code, skipped = _prepare(root, tmp_path / "out", "--strict", workers=2)
    assert code == 0 and not skipped and len(read_manifest(tmp_path / "out" / "manifest.csv")) == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_reported(one_subject, tmp_path: Path, case: str, workers: int) -> None:
    dataset, mutate, reason = CASES[case]
    root, folder, metadata = _subject(one_subject, tmp_path, dataset)
    bad_path = mutate(folder, metadata)
    code, skipped = _prepare(root, tmp_path / "out", "--strict", workers=workers)
    assert code == 1 and not (tmp_path / "out" / "manifest.csv").exists()
    assert len(skipped) == 1 and skipped[0]["path"] == str(bad_path), skipped
    assert reason in skipped[0]["reason"], skipped[0]["reason"]


def test_mnms_frame_out_of_range_names_file_and_field(one_subject, tmp_path: Path, workers: int) -> None:
    root, folder, csv_path = one_subject("mnms")
    _set_csv_field(csv_path, "ES", "99")
    code, skipped = _prepare(root, tmp_path / "out", "--strict", workers=workers)
    assert code == 1 and skipped[0]["path"] == str(folder / f"{folder.name}_sa.nii.gz")
    assert "frame index 99 out of range" in skipped[0]["reason"] and "field ES of" in skipped[0]["reason"]


def test_mnms_ed_equal_es_and_unknown_code(one_subject, tmp_path: Path, workers: int) -> None:
    root, _, csv_path = one_subject("mnms")
    _set_csv_field(csv_path, "ES", csv_path.read_text().splitlines()[1].split(",")[5])
    _, skipped = _prepare(root, tmp_path / "out1", workers=workers)
    assert skipped[0]["path"] == str(csv_path) and "ED equals ES" in skipped[0]["reason"]
    _set_csv_field(csv_path, "ES", "1" if csv_path.read_text().splitlines()[1].split(",")[5] != "1" else "2")
    _set_csv_field(csv_path, "Pathology", "Healthy")
    _, skipped = _prepare(root, tmp_path / "out2", workers=workers)
    assert "unknown pathology code 'Healthy' in field Pathology" in skipped[0]["reason"]


def test_mnms_3d_cine_is_a_dimension_error(one_subject, tmp_path: Path, workers: int) -> None:
    root, folder, _ = one_subject("mnms")
    image = folder / f"{folder.name}_sa.nii.gz"
    _replace_image(image, np.asanyarray(nib.load(image).dataobj)[..., 0])
    _, skipped = _prepare(root, tmp_path / "out", workers=workers)
    assert skipped[0]["path"] == str(image) and "expected a 4D image" in skipped[0]["reason"]


@pytest.mark.parametrize("dataset", ["mnms", "mnms2"])
def test_csv_row_without_image_and_image_without_row(one_subject, tmp_path: Path, dataset: str, workers: int) -> None:
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
    code, skipped = _prepare(root, tmp_path / "out", workers=workers)
    reasons = {row["path"]: row["reason"] for row in skipped}
    assert code == 0 and len(read_manifest(tmp_path / "out" / "manifest.csv")) == 1
    assert "CSV row" in reasons[str(csv_path)] and "has no image" in reasons[str(csv_path)]
    stray_image = next(p for p in stray.iterdir() if p.name.endswith(("_sa.nii.gz", "_SA_ED.nii.gz")))
    assert "image without a CSV row" in reasons[str(stray_image)]


def test_without_strict_bad_subjects_are_skipped_and_others_prepared(
    one_subject, tmp_path: Path, workers: int
) -> None:
    good_root, _, _ = one_subject("mnms2")
    bad_root, bad_folder, _ = one_subject("acdc")
    _edit_info(bad_folder, "Group", "XYZ")
    combined = tmp_path / "combined"
    shutil.copytree(good_root, combined / "good")
    shutil.copytree(bad_root, combined / "bad")
    code, skipped = _prepare(combined, tmp_path / "out", workers=workers)
    assert code == 0 and len(read_manifest(tmp_path / "out" / "manifest.csv")) == 1
    assert len(skipped) == 1 and skipped[0]["path"].endswith("Info.cfg")
    code, _ = _prepare(combined, tmp_path / "strict", "--strict", workers=workers)
    assert code == 1


def _clone_acdc(folder: Path, number: int) -> Path:
    """Copy an ACDC patient folder under another patient number (file names renamed to match)."""
    pid = f"patient{number:03d}"
    target = folder.parent / pid
    shutil.copytree(folder, target)
    for path in target.iterdir():
        path.rename(target / path.name.replace(folder.name, pid))
    return target


def test_mixed_cohort_gives_the_same_outputs_with_one_and_two_workers(one_subject, tmp_path: Path) -> None:
    """The issue's reproduction: bad subjects of several kinds among good ones; two workers must neither hang nor
    differ from one."""
    root, acdc_folder, _ = one_subject("acdc")
    for dataset in ("mnms", "mnms2"):
        shutil.copytree(one_subject(dataset)[0], root / dataset)
    _clone_acdc(acdc_folder, 905)
    truncated = _ed_frame(_clone_acdc(acdc_folder, 901))
    _truncate(truncated)
    no_group = _clone_acdc(acdc_folder, 902)
    _edit_info(no_group, "Group", None)
    unknown_code = _clone_acdc(acdc_folder, 903)
    _edit_info(unknown_code, "Group", "XYZ")
    nan_image = _ed_frame(_clone_acdc(acdc_folder, 904))
    _replace_image(nan_image, np.full(nib.load(nan_image).shape, np.nan, np.float32))
    outputs = {}
    for n_workers in (1, 2):
        out = tmp_path / f"out{n_workers}"
        code, skipped = _prepare(root, out, workers=n_workers)
        assert code == 0
        outputs[n_workers] = [(out / name).read_bytes() for name in ("manifest.csv", "skipped.csv")]
    assert outputs[1] == outputs[2]
    assert len(read_manifest(tmp_path / "out2" / "manifest.csv")) == 4
    assert [(row["path"], row["reason"].split(" (")[0]) for row in skipped] == [
        (str(no_group / "Info.cfg"), "missing or empty field Group"),
        (str(unknown_code / "Info.cfg"), "unknown pathology code 'XYZ' in field Group"),
        (str(truncated), "unreadable or truncated NIfTI"),
        (str(nan_image), f"image {nan_image} contains NaN or infinite values"),
    ]


def test_atomic_write_leaves_no_valid_looking_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash_midway(image: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"\x1f\x8b half a volume")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", crash_midway)
    target = tmp_path / "volumes" / "subject.nii.gz"
    with pytest.raises(OSError, match="disk full"):
        nifti.save_atomic(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), target)
    assert not target.exists() and not list(target.parent.iterdir())


def test_leftover_partial_files_are_removed_by_the_next_run(one_subject, tmp_path: Path, workers: int) -> None:
    root, _, _ = one_subject("mnms2")
    leftover = tmp_path / "out" / "volumes" / "siemens" / f".mnms2_001.123{nifti.PARTIAL_SUFFIX}"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    code, _ = _prepare(root, tmp_path / "out", workers=workers)
    assert code == 0 and not leftover.exists()


def test_missing_raw_folder_is_a_usage_error(tmp_path: Path) -> None:
    assert prepare_main(["--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
