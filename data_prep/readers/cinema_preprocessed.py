"""Reader for CineMA-preprocessed folders: `{pid}_sax_ed.nii.gz` / `{pid}_sax_es.nii.gz` plus a metadata CSV."""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.readers import mnms, mnms2
from data_prep.readers.common import label_if_present, read_csv, under
from data_prep.records import (
    KNOWN_CODES,
    MNMS_VENDOR_LETTERS,
    FrameRef,
    InputError,
    LabelRule,
    SubjectRecord,
    vendor_from_name,
)

SUBJECT_IMAGE = re.compile(r"(.+)_sax_ed\.nii\.gz")
REQUIRED_COLUMNS = ("pid", "pathology")


def _dataset_and_vendor(csv_path: Path, row: dict[str, str]) -> tuple[str, str]:
    """(dataset, client) of a metadata row: M&Ms-1 has vendor letters, M&Ms-2 raw vendor strings, ACDC none."""
    pid, vendor = row["pid"], row.get("vendor", "")
    if vendor.upper() in MNMS_VENDOR_LETTERS:
        return "mnms", MNMS_VENDOR_LETTERS[vendor.upper()]
    if vendor:
        client = vendor_from_name(vendor)
        if client is None:
            raise InputError(csv_path, f"row {pid}: unknown vendor {vendor!r} in field vendor")
        dataset = row.get("dataset") or "mnms2"
        if dataset not in KNOWN_CODES:
            raise InputError(
                csv_path, f"row {pid}: field dataset is {dataset!r}; expected one of {', '.join(sorted(KNOWN_CODES))}"
            )
        return dataset, client
    if pid.startswith("patient"):
        return "acdc", "siemens"
    raise InputError(csv_path, f"row {pid}: no vendor field and not an ACDC id: cannot tell dataset and vendor")


def _is_metadata_csv(path: Path) -> bool:
    """A CSV with `pid` and `pathology` columns that is not one of the raw-layout CSVs."""
    if path.suffix.lower() != ".csv" or mnms.CSV_NAME.fullmatch(path.name) or path.name.lower() == mnms2.CSV_NAME:
        return False
    try:
        header, _ = read_csv(path)
    except InputError:
        return False
    return all(name in header for name in REQUIRED_COLUMNS)


def _record(csv_path: Path, row: dict[str, str], ed_image: Path, rule: LabelRule) -> SubjectRecord:
    """One subject from its metadata row and ED file."""
    pid = row["pid"]
    dataset, client = _dataset_and_vendor(csv_path, row)
    pathology, label = rule.code_and_label(dataset, row["pathology"], csv_path, f"pathology (row {pid})")
    folder = ed_image.parent
    ed_gt = folder / f"{pid}_sax_ed_gt.nii.gz"
    es_gt = folder / f"{pid}_sax_es_gt.nii.gz"
    return SubjectRecord(
        pid=pid,
        dataset=dataset,
        vendor=client,
        centre=row.get("center", "") or row.get("scanner", ""),
        pathology=pathology,
        label=label,
        ed_image=FrameRef(ed_image),
        es_image=FrameRef(folder / f"{pid}_sax_es.nii.gz"),
        ed_label=label_if_present(ed_gt),
        es_label=label_if_present(es_gt),
        layout="cinema",
        source=folder,
    )


def _read_folder(
    csv_paths: list[Path], images: list[Path], rule: LabelRule
) -> tuple[list[SubjectRecord], list[InputError]]:
    """Subjects of one folder whose metadata CSVs (e.g. train/val/test_metadata.csv) list the volumes below it."""
    rows: dict[str, tuple[Path, dict[str, str]]] = {}
    problems: list[InputError] = []
    for csv_path in csv_paths:
        for row in read_csv(csv_path)[1]:
            if not row["pid"]:
                problems.append(InputError(csv_path, f"row without a value in field 'pid': {row}"))
                continue
            rows.setdefault(row["pid"], (csv_path, row))
    by_pid = {image.name.removesuffix("_sax_ed.nii.gz"): image for image in images}
    records: list[SubjectRecord] = []
    for pid, (csv_path, row) in sorted(rows.items()):
        if pid not in by_pid:
            problems.append(InputError(csv_path, f"CSV row {pid} has no image {pid}_sax_ed.nii.gz"))
            continue
        try:
            records.append(_record(csv_path, row, by_pid[pid], rule))
        except InputError as error:
            problems.append(error)
    problems.extend(
        InputError(image, f"image without a CSV row: pid {pid} is not in {', '.join(p.name for p in csv_paths)}")
        for pid, image in sorted(by_pid.items())
        if pid not in rows
    )
    return records, problems


def find(files: list[Path], rule: LabelRule) -> tuple[list[SubjectRecord], list[InputError]]:
    """All CineMA-preprocessed subjects among `files`, plus problems."""
    images = [path for path in files if SUBJECT_IMAGE.fullmatch(path.name)]
    if not images:
        return [], []
    by_folder: dict[Path, list[Path]] = {}
    for csv_path in (path for path in files if _is_metadata_csv(path)):
        by_folder.setdefault(csv_path.parent, []).append(csv_path)
    records: list[SubjectRecord] = []
    problems: list[InputError] = []
    claimed: set[Path] = set()
    for folder, csv_paths in sorted(by_folder.items(), key=lambda item: (-len(item[0].parts), item[0])):
        folder_images = [image for image in images if under(image, folder) and image not in claimed]
        claimed.update(folder_images)
        found, issues = _read_folder(csv_paths, folder_images, rule)
        records.extend(found)
        problems.extend(issues)
    problems.extend(
        InputError(image, "image without a CSV row: no metadata CSV with pid/pathology columns found above it")
        for image in images
        if image not in claimed
    )
    return records, problems
