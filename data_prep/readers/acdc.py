"""ACDC reader: `patientNNN/Info.cfg` with 1-based ED/ES frame numbers, `_frameYY[_gt]` files, labels 1 RV / 3 LV."""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.readers.common import check_ed_es, label_if_present, parse_int, present
from data_prep.records import ACDC_LABEL_MAP, FrameRef, InputError, LabelRule, SubjectRecord

PATIENT_DIR = re.compile(r"patient\d{3}")
PATIENT_IMAGE = re.compile(r"(patient\d{3})_(4d|frame\d+)(_gt)?\.nii\.gz")
REQUIRED_FIELDS = ("ED", "ES", "Group", "NbFrame")


def parse_info_cfg(path: Path) -> dict[str, str]:
    """`Key: value` lines of an Info.cfg; a garbled line or a missing required field raises InputError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"unreadable Info.cfg ({type(error).__name__}: {error})") from error
    fields: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise InputError(path, f"garbled line {number} {line!r} (expected 'Key: value')")
        fields[key.strip()] = value.strip()
    for name in REQUIRED_FIELDS:
        if not fields.get(name):
            raise InputError(path, f"missing or empty field {name}")
    return fields


def read_patient(info_path: Path, rule: LabelRule) -> SubjectRecord:
    """One ACDC subject from its Info.cfg; frame files are resolved from the 1-based ED/ES numbers."""
    fields = parse_info_cfg(info_path)
    folder, pid = info_path.parent, info_path.parent.name
    n_frames = parse_int(info_path, fields["NbFrame"], "NbFrame")
    frames = {}
    for name in ("ED", "ES"):
        number = parse_int(info_path, fields[name], name)
        if not 1 <= number <= n_frames:
            raise InputError(info_path, f"field {name} = {number} out of range 1..{n_frames} (1-based, NbFrame)")
        frames[name] = number
    check_ed_es(info_path, frames["ED"], frames["ES"], "fields ED/ES of Info.cfg")
    code, label = rule.code_and_label("acdc", fields["Group"], info_path, "Group")

    def image(number: int, name: str) -> FrameRef:
        frame_file = folder / f"{pid}_frame{number:02d}.nii.gz"
        if present(frame_file):
            return FrameRef(frame_file)
        return FrameRef(folder / f"{pid}_4d.nii.gz", number - 1, frame_field=f"field {name} of {info_path}")

    def label_ref(number: int) -> FrameRef | None:
        return label_if_present(folder / f"{pid}_frame{number:02d}_gt.nii.gz", ACDC_LABEL_MAP)

    return SubjectRecord(
        pid=pid,
        dataset="acdc",
        vendor="siemens",
        centre="dijon",
        pathology=code,
        label=label,
        ed_image=image(frames["ED"], "ED"),
        es_image=image(frames["ES"], "ES"),
        ed_label=label_ref(frames["ED"]),
        es_label=label_ref(frames["ES"]),
        source=folder,
        extra={"height": fields.get("Height", ""), "weight": fields.get("Weight", "")},
    )


def find(files: list[Path], rule: LabelRule) -> tuple[list[SubjectRecord], list[InputError]]:
    """All ACDC subjects among `files`, plus problems (bad Info.cfg, images without an Info.cfg)."""
    records: list[SubjectRecord] = []
    problems: list[InputError] = []
    configs = {path.parent for path in files if path.name == "Info.cfg" and PATIENT_DIR.fullmatch(path.parent.name)}
    for folder in sorted(configs):
        try:
            records.append(read_patient(folder / "Info.cfg", rule))
        except InputError as error:
            problems.append(error)
    orphans: dict[Path, Path] = {}
    for path in files:
        match = PATIENT_IMAGE.fullmatch(path.name)
        if match and path.parent not in configs and match.group(1) == path.parent.name:
            orphans.setdefault(path.parent, path)
    problems.extend(
        InputError(image, "image without metadata: no Info.cfg in its patient folder") for image in orphans.values()
    )
    return records, problems
