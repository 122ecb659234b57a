"""Outputs of a prepare run: atomic CSVs (manifest.csv, skipped.csv), prepared.json (geometry, settings, counts,
warnings about degenerate splits) and the end-of-run summary (client × split × label counts)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from data_prep.records import InputError
from data_prep.splits import MANIFEST_SPLITS, SPLITS
from models.atomic_io import write_text_atomic
from models.protocol import MIN_SUBJECTS_PER_FIGURE, MIN_TRAIN_SUBJECTS, SITES

MANIFEST_COLUMNS = (
    "subject_id",
    "dataset",
    "vendor",
    "client",
    "split",
    "pathology",
    "label",
    "image",
    "layout",
    "centre",
    "source",
    "n_slices",
    "orig_spacing_x",
    "orig_spacing_y",
    "orig_spacing_z",
    "crop_method",
)
SKIPPED_COLUMNS = ("path", "reason")
PREPARED_FILE = "prepared.json"
PREPARED_SCHEMA = "med-duallora/prepared/1"
PREPARED_FIELDS = ("schema", "geometry", "seed", "val_fraction", "test_fraction", "label_rule", "counts", "warnings")
GEOMETRY_FIELDS = ("crop", "spacing_mm", "depth")


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Iterable[dict[str, object]]) -> None:
    """Write a CSV under a temporary name, then rename it into place."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_skipped(path: Path, problems: Iterable[InputError]) -> None:
    """skipped.csv: one row (path, reason) per refused input."""
    write_csv_atomic(path, SKIPPED_COLUMNS, ({"path": p.path, "reason": p.reason} for p in problems))


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv as dicts of strings; every `image` must lie under the data root (see `image_path`)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if "image" in row:
            image_path(path, row)
    return rows


def image_path(manifest: Path, row: Mapping[str, str]) -> Path:
    """The resolved volume of a manifest row (symbolic links followed); ValueError unless it lies in the data root.

    `image` is relative to the data root (the manifest's folder): an absolute path, `..` or a link leading out of the
    root are refused, naming the manifest, the row's subject_id and the field.
    """
    where = f"{manifest}: row subject_id={row.get('subject_id', '?')!r}, field image={row.get('image')!r}"
    value = row.get("image") or ""
    if not value.strip():
        raise ValueError(f"{where}: empty volume path")
    try:
        data_root = Path(manifest).parent.resolve()
        resolved = (data_root / value).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise ValueError(f"{where}: cannot resolve the volume path ({error})") from error
    if resolved == data_root or not resolved.is_relative_to(data_root):
        raise ValueError(f"{where}: resolves to {resolved}, outside the data root {data_root}")
    return resolved


def summary(rows: Sequence[dict[str, object]], n_skipped: int, n_warnings: int = 0) -> str:
    """Table of counts per client × split × label (healthy/diseased), plus totals and the skipped / warning counts."""
    counts = Counter((str(r["client"]), str(r["split"]), int(r["label"])) for r in rows)
    clients = sorted({str(r["client"]) for r in rows})
    header = f"{'client':<9}" + "".join(f"{split + ' 0/1':>13}" for split in SPLITS) + f"{'total':>8}"
    lines = [header]
    for client in clients:
        cells = "".join(f"{counts[client, s, 0]:>9}/{counts[client, s, 1]:<3}" for s in SPLITS)
        total = sum(v for (c, _, _), v in counts.items() if c == client)
        lines.append(f"{client:<9}{cells}{total:>8}")
    lines.append(
        f"prepared {len(rows)} subjects, skipped {n_skipped}, warnings {n_warnings} (label 0 = healthy, 1 = diseased)"
    )
    return "\n".join(lines)


# ---- prepared.json: degenerate splits and the settings other steps read back ---------------------------------------


def split_counts(rows: Iterable[Mapping[str, object]]) -> dict[str, dict[str, Any]]:
    """Subjects per client and split, with the healthy ones (label 0) per split: prepared.json `counts` (train, val
    and test always; another split of MANIFEST_SPLITS when present; any other value is a ValueError)."""
    counts: dict[str, dict[str, Any]] = {}
    for row in rows:
        client, split = str(row["client"]), str(row["split"])
        if split not in MANIFEST_SPLITS:
            raise ValueError(
                f"row subject_id={row.get('subject_id', '?')!r}: field split is {split!r}, "
                f"expected one of {', '.join(MANIFEST_SPLITS)}"
            )
        entry = counts.setdefault(client, {**dict.fromkeys(SPLITS, 0), "healthy": dict.fromkeys(SPLITS, 0)})
        entry[split] = entry.get(split, 0) + 1
        entry["healthy"][split] = entry["healthy"].get(split, 0) + (1 if int(row["label"]) == 0 else 0)
    return dict(sorted(counts.items()))


def site_warnings(client: str, count: Mapping[str, Any]) -> list[str]:
    """Why one site's splits cannot train, or cannot report a figure on, a model (empty when they can)."""
    warnings = []
    for split in ("val", "test"):
        if count[split] == 0:
            warnings.append(f"site {client}: no {split} subjects")
        elif count[split] < MIN_SUBJECTS_PER_FIGURE:
            warnings.append(
                f"site {client}: {count[split]} {split} subject(s), too few to report a figure "
                f"(fewer than {MIN_SUBJECTS_PER_FIGURE})"
            )
    train, healthy = count["train"], count["healthy"]["train"]
    if train < MIN_TRAIN_SUBJECTS:
        warnings.append(f"site {client}: {train} training subject(s), fewer than {MIN_TRAIN_SUBJECTS}")
    elif healthy in (0, train):
        kind = "healthy (label 0)" if healthy else "diseased (label 1)"
        warnings.append(f"site {client}: all {train} training subjects are {kind}: a single class")
    return warnings


def split_warnings(counts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings of every prepared site (see `site_warnings`) and of every federation site with no subject."""
    warnings = []
    for client in [*SITES, *sorted(set(counts) - set(SITES))]:
        if client in counts:
            warnings.extend(site_warnings(client, counts[client]))
        else:
            warnings.append(f"site {client}: no subject prepared; it cannot join a federated run")
    return warnings


def read_prepared(root: Path | str) -> dict[str, Any]:
    """`<root>/prepared.json`, checked; FileNotFoundError or ValueError naming the file (and the field)."""
    path = Path(root) / PREPARED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (python -m data_prep.prepare writes it; prepare {root} again)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable JSON ({type(error).__name__}: {error})") from error
    _require_fields(path, record, PREPARED_FIELDS, "")
    if record["schema"] != PREPARED_SCHEMA:
        raise ValueError(f"{path}: field schema is {record['schema']!r}, expected {PREPARED_SCHEMA!r}")
    geometry = record["geometry"]
    _require_fields(path, geometry, GEOMETRY_FIELDS, "geometry.")
    _require_values(path, geometry["crop"], "geometry.crop", 2, integer=True)
    _require_values(path, geometry["spacing_mm"], "geometry.spacing_mm", 3, integer=False)
    if not _positive(geometry["depth"], integer=True):
        raise ValueError(f"{path}: field geometry.depth is {geometry['depth']!r}, expected a positive integer")
    return record


def _require_fields(path: Path, record: object, names: Sequence[str], prefix: str) -> None:
    """ValueError naming the file and the first field of `names` missing from the JSON object `record`."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: field {prefix.rstrip('.') or '(top level)'} is not a JSON object")
    for name in names:
        if name not in record:
            raise ValueError(f"{path}: missing field {prefix}{name}")


def _positive(value: object, integer: bool) -> bool:
    """True for a positive JSON number (an integer when `integer`); booleans are not numbers here."""
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0


def _require_values(path: Path, values: object, name: str, length: int, integer: bool) -> None:
    """ValueError naming the file and field unless `values` is a list of `length` positive numbers."""
    if not (isinstance(values, list) and len(values) == length and all(_positive(v, integer) for v in values)):
        what = "integers" if integer else "numbers"
        raise ValueError(f"{path}: field {name} is {values!r}, expected {length} positive {what}")
