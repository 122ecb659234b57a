"""Readers for the four supported inputs; `discover` searches folders recursively and returns records and problems."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data_prep.readers import acdc, cinema_preprocessed, mnms, mnms2
from data_prep.readers.common import list_files
from data_prep.records import InputError, LabelRule, SubjectRecord

READERS = (acdc, mnms, mnms2, cinema_preprocessed)


@dataclass
class Discovery:
    """Subjects found (sorted by subject id, duplicates removed) and the inputs refused while finding them."""

    records: list[SubjectRecord]
    problems: list[InputError]


def discover(roots: list[Path], rule: LabelRule) -> Discovery:
    """Find every supported layout at any depth under `roots`."""
    files = sorted({Path(os.path.abspath(path)) for root in roots for path in list_files(Path(root))})
    records: list[SubjectRecord] = []
    problems: list[InputError] = []
    for reader in READERS:
        found, issues = reader.find(files, rule)
        records.extend(found)
        problems.extend(issues)
    unique: dict[str, SubjectRecord] = {}
    for record in sorted(records, key=lambda r: (r.subject_id, r.layout != "raw", str(r.source))):
        if record.subject_id in unique:
            first = unique[record.subject_id]
            problems.append(InputError(record.source, f"duplicate subject {record.subject_id} (kept {first.source})"))
        else:
            unique[record.subject_id] = record
    return Discovery(list(unique.values()), problems)
