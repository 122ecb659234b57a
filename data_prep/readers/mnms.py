"""M&Ms-1 reader: dated `*M&Ms_Dataset_*.csv` (columns by name, 0-based ED/ES), 4D `<CODE>_sa[_gt].nii.gz`."""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.readers.common import check_ed_es, find_per_root, parse_int, present, read_csv, require_columns
from data_prep.records import (
    MNMS_LABEL_MAP,
    MNMS_VENDOR_LETTERS,
    FrameRef,
    InputError,
    LabelRule,
    SubjectRecord,
    vendor_from_name,
)

CSV_NAME = re.compile(r".*m&ms_dataset_.*\.csv", re.IGNORECASE)
SUBJECT_IMAGE = re.compile(r"([A-Z]\d[A-Z]\d[A-Z]\d)_sa\.nii\.gz")
REQUIRED_COLUMNS = ("External code", "ED", "ES", "Pathology")
UNLABELED_FOLDER = "Unlabeled"


def metadata_csvs(files: list[Path]) -> list[Path]:
    """One metadata CSV per folder: the latest release (names start with a yymmdd date) when several are present."""
    by_folder: dict[Path, Path] = {}
    for path in sorted(files):
        if CSV_NAME.fullmatch(path.name):
            by_folder[path.parent] = path
    return sorted(by_folder.values())


def _vendor(csv_path: Path, row: dict[str, str], code: str) -> str:
    """Client from the `Vendor` letter (A-D), else from `VendorName`."""
    letter = row.get("Vendor", "").strip().upper()
    if letter in MNMS_VENDOR_LETTERS:
        return MNMS_VENDOR_LETTERS[letter]
    vendor = vendor_from_name(row.get("VendorName", ""))
    if vendor is None:
        raise InputError(
            csv_path, f"row {code}: unknown vendor (field Vendor {letter!r}, VendorName {row.get('VendorName', '')!r})"
        )
    return vendor


def _record(csv_path: Path, row: dict[str, str], code: str, image: Path, rule: LabelRule) -> SubjectRecord:
    """One subject from its CSV row and its 4D image."""
    ed = parse_int(csv_path, row["ED"], f"ED (row {code})")
    es = parse_int(csv_path, row["ES"], f"ES (row {code})")
    check_ed_es(csv_path, ed, es, f"fields ED/ES of row {code}")
    pathology, label = rule.code_and_label("mnms", row["Pathology"], csv_path, f"Pathology (row {code})")
    vendor = _vendor(csv_path, row, code)
    gt = image.with_name(f"{code}_sa_gt.nii.gz")
    has_gt = present(gt) and UNLABELED_FOLDER not in image.parts

    def frame(path: Path, index: int, name: str, label_map: dict[int, int] | None) -> FrameRef:
        return FrameRef(path, index, label_map, frame_field=f"field {name} of {csv_path.name}, row {code}, 0-based")

    return SubjectRecord(
        pid=code,
        dataset="mnms",
        vendor=vendor,
        centre=row.get("Centre", ""),
        pathology=pathology,
        label=label,
        ed_image=frame(image, ed, "ED", None),
        es_image=frame(image, es, "ES", None),
        ed_label=frame(gt, ed, "ED", MNMS_LABEL_MAP) if has_gt else None,
        es_label=frame(gt, es, "ES", MNMS_LABEL_MAP) if has_gt else None,
        source=image.parent,
        extra={"folder": "/".join(image.parent.parent.parts[-2:])},
    )


def _read_root(csv_path: Path, images: list[Path], rule: LabelRule) -> tuple[list[SubjectRecord], list[InputError]]:
    """Subjects of one M&Ms-1 root (the folder holding the CSV)."""
    header, rows = read_csv(csv_path)
    require_columns(csv_path, header, REQUIRED_COLUMNS)
    if "Vendor" not in header and "VendorName" not in header:
        raise InputError(csv_path, "missing column 'Vendor' (and 'VendorName')")
    records: list[SubjectRecord] = []
    problems: list[InputError] = []
    by_code: dict[str, Path] = {}
    for image in images:
        code = image.name.removesuffix("_sa.nii.gz")
        if code in by_code:
            problems.append(InputError(image, f"duplicate subject {code} (also {by_code[code]})"))
        else:
            by_code[code] = image
    seen: set[str] = set()
    for row in rows:
        code = row.get("External code", "")
        if not code:
            problems.append(InputError(csv_path, f"row without a value in field 'External code': {row}"))
            continue
        seen.add(code)
        if code not in by_code:
            problems.append(InputError(csv_path, f"CSV row {code} has no image {code}/{code}_sa.nii.gz"))
            continue
        try:
            records.append(_record(csv_path, row, code, by_code[code], rule))
        except InputError as error:
            problems.append(error)
    problems.extend(
        InputError(image, f"image without a CSV row: code {code} is not in {csv_path.name}")
        for code, image in sorted(by_code.items())
        if code not in seen
    )
    return records, problems


def find(files: list[Path], rule: LabelRule) -> tuple[list[SubjectRecord], list[InputError]]:
    """All M&Ms-1 subjects among `files`, plus problems."""
    images = [p for p in files if (m := SUBJECT_IMAGE.fullmatch(p.name)) and m.group(1) == p.parent.name]
    return find_per_root(
        images,
        metadata_csvs(files),
        lambda csv_path, root_images: _read_root(csv_path, root_images, rule),
        "image without a CSV row: no *M&Ms_Dataset_*.csv found above it",
    )
