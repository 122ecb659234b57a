"""M&Ms-2 reader: 5-column `dataset_information.csv` (padding rows, int codes), `NNN/NNN_SA_{ED,ES}[_gt].nii.gz`."""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.readers.common import find_per_root, label_if_present, parse_int, read_csv, require_columns
from data_prep.records import MNMS_LABEL_MAP, FrameRef, InputError, LabelRule, SubjectRecord, vendor_from_name

CSV_NAME = "dataset_information.csv"
SUBJECT_IMAGE = re.compile(r"(\d{3})_SA_ED\.nii\.gz")
REQUIRED_COLUMNS = ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD")


def _record(csv_path: Path, row: dict[str, str], pid: str, ed_image: Path, rule: LabelRule) -> SubjectRecord:
    """One subject from its CSV row and its SA_ED file (SA_ES and the labels sit beside it)."""
    pathology, label = rule.code_and_label("mnms2", row["DISEASE"], csv_path, f"DISEASE (row {pid})")
    vendor = vendor_from_name(row["VENDOR"])
    if vendor is None:
        raise InputError(csv_path, f"row {pid}: unknown vendor {row['VENDOR']!r} in field VENDOR")
    folder = ed_image.parent

    def label_ref(phase: str) -> FrameRef | None:
        return label_if_present(folder / f"{pid}_SA_{phase}_gt.nii.gz", MNMS_LABEL_MAP)

    return SubjectRecord(
        pid=pid,
        dataset="mnms2",
        vendor=vendor,
        centre=row["SCANNER"],
        pathology=pathology,
        label=label,
        ed_image=FrameRef(ed_image),
        es_image=FrameRef(folder / f"{pid}_SA_ES.nii.gz"),
        ed_label=label_ref("ED"),
        es_label=label_ref("ES"),
        source=folder,
        extra={"scanner": row["SCANNER"], "field": row["FIELD"]},
    )


def _read_root(csv_path: Path, images: list[Path], rule: LabelRule) -> tuple[list[SubjectRecord], list[InputError]]:
    """Subjects of one M&Ms-2 root (the folder holding the CSV)."""
    header, rows = read_csv(csv_path)
    require_columns(csv_path, header, REQUIRED_COLUMNS)
    by_pid = {image.name.removesuffix("_SA_ED.nii.gz"): image for image in images}
    records: list[SubjectRecord] = []
    problems: list[InputError] = []
    seen: set[str] = set()
    for row in rows:
        try:
            if not row["SUBJECT_CODE"]:
                raise InputError(csv_path, f"row without a value in field 'SUBJECT_CODE': {row}")
            number = parse_int(csv_path, row["SUBJECT_CODE"], "SUBJECT_CODE")
            pid = f"{number:03d}"
            seen.add(pid)
            if pid not in by_pid:
                raise InputError(csv_path, f"CSV row {pid} has no image {pid}/{pid}_SA_ED.nii.gz")
            records.append(_record(csv_path, row, pid, by_pid[pid], rule))
        except InputError as error:
            problems.append(error)
    problems.extend(
        InputError(image, f"image without a CSV row: SUBJECT_CODE {int(pid)} is not in {csv_path.name}")
        for pid, image in sorted(by_pid.items())
        if pid not in seen
    )
    return records, problems


def find(files: list[Path], rule: LabelRule) -> tuple[list[SubjectRecord], list[InputError]]:
    """All M&Ms-2 subjects among `files`, plus problems."""
    images = [p for p in files if (m := SUBJECT_IMAGE.fullmatch(p.name)) and m.group(1) == p.parent.name]
    return find_per_root(
        images,
        sorted(p for p in files if p.name.lower() == CSV_NAME),
        lambda csv_path, root_images: _read_root(csv_path, root_images, rule),
        f"image without a CSV row: no {CSV_NAME} found above it",
    )
