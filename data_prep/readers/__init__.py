"""Readers for the four supported inputs; `discover` searches folders recursively and returns records and problems."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.readers import acdc, cinema_preprocessed, mnms, mnms2
from data_prep.readers.common import list_files
from data_prep.records import InputError, LabelRule, SubjectRecord

READERS = (acdc, mnms, mnms2, cinema_preprocessed)
SUBJECT_ANCHORS: tuple[tuple[re.Pattern[str], bool], ...] = (
    (acdc.PATIENT_IMAGE, True),
    (mnms.SUBJECT_IMAGE, True),
    (mnms2.SUBJECT_IMAGE, True),
    (cinema_preprocessed.SUBJECT_IMAGE, False),
)
"""File names a reader takes as a subject's image (group 1: the subject id) and whether the folder must be named after
the subject. Every `{id}_*.nii.gz` beside such a file belongs to that subject (4D cine, labels, long-axis views)."""
NIFTI_SUFFIXES = (".nii.gz", ".nii")
UNRECOGNISED_REASON = (
    "not recognised as any supported layout (ACDC patientNNN/patientNNN_frameYY.nii.gz + Info.cfg, "
    "M&Ms-1 <CODE>/<CODE>_sa.nii.gz + *M&Ms_Dataset_*.csv, M&Ms-2 NNN/NNN_SA_ED.nii.gz + dataset_information.csv, "
    "CineMA-preprocessed {pid}_sax_ed.nii.gz / {pid}_sax_es.nii.gz + a CSV with columns pid,pathology); "
    'see README "Input layouts"'
)
UNCOMPRESSED_HINT = "; only gzip-compressed .nii.gz files are read (compress it with gzip)"
MISSING_PID_HINT = "; a CineMA-preprocessed file needs its subject id in front of its name: {pid}_sax_ed.nii.gz"
CINEMA_WITHOUT_PID = re.compile(r"sax_(ed|es)(_gt)?\.nii\.gz")


@dataclass
class Discovery:
    """Subjects found (sorted by subject id, duplicates removed), the inputs refused while finding them, and the
    NIfTI files that no reader recognised (neither a subject's file nor named in a problem)."""

    records: list[SubjectRecord]
    problems: list[InputError]
    unrecognised: list[InputError] = field(default_factory=list)


def discover(roots: list[Path], rule: LabelRule) -> Discovery:
    """Find every supported layout at any depth under `roots`."""
    files = sorted({Path(os.path.abspath(path)) for root in roots for path in list_files(Path(root))})
    records: list[SubjectRecord] = []
    problems: list[InputError] = []
    for reader in READERS:
        found, issues = reader.find(files, rule)
        records.extend(found)
        problems.extend(issues)
    unrecognised = unrecognised_files(files, records, problems)
    unique: dict[str, SubjectRecord] = {}
    for record in sorted(records, key=lambda r: (r.subject_id, r.layout != "raw", str(r.source))):
        if record.subject_id in unique:
            first = unique[record.subject_id]
            problems.append(InputError(record.source, f"duplicate subject {record.subject_id} (kept {first.source})"))
        else:
            unique[record.subject_id] = record
    return Discovery(list(unique.values()), problems, unrecognised)


def is_nifti(path: Path) -> bool:
    """True for a `.nii.gz` or `.nii` file name (any case)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def subject_prefixes(files: Iterable[Path]) -> dict[Path, set[str]]:
    """Folder → the `{id}_` prefixes of the subjects whose images a reader takes from it (see SUBJECT_ANCHORS)."""
    prefixes: dict[Path, set[str]] = defaultdict(set)
    for path in files:
        for pattern, in_own_folder in SUBJECT_ANCHORS:
            match = pattern.fullmatch(path.name)
            if match and (not in_own_folder or match.group(1) == path.parent.name):
                prefixes[path.parent].add(f"{match.group(1)}_")
    return prefixes


def unrecognised_files(
    files: list[Path], records: Iterable[SubjectRecord], problems: Iterable[InputError]
) -> list[InputError]:
    """NIfTI files that are no record's frame or label, named in no problem, and belong to no subject found."""
    claimed = {Path(problem.path) for problem in problems}
    for record in records:
        refs = (record.ed_image, record.es_image, record.ed_label, record.es_label)
        claimed.update(ref.path for ref in refs if ref is not None)
    prefixes = subject_prefixes(files)
    found = []
    for path in files:
        if not is_nifti(path) or path in claimed:
            continue
        if path.name.endswith(".nii.gz") and path.name.startswith(tuple(prefixes.get(path.parent, ()))):
            continue
        found.append(InputError(path, UNRECOGNISED_REASON + _hint(path)))
    return found


def _hint(path: Path) -> str:
    """What to change in an unrecognised file's name when the likely fix is known ('' otherwise)."""
    if path.name.lower().endswith(".nii"):
        return UNCOMPRESSED_HINT
    if CINEMA_WITHOUT_PID.fullmatch(path.name):
        return MISSING_PID_HINT
    return ""
