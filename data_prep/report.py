"""Atomic CSV outputs (manifest.csv, skipped.csv) and the end-of-run summary (client × split × label counts)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from data_prep.records import InputError
from data_prep.splits import SPLITS
from models.atomic_io import write_text_atomic

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


def summary(rows: Sequence[dict[str, object]], n_skipped: int) -> str:
    """Table of counts per client × split × label (healthy/diseased), plus totals."""
    counts = Counter((str(r["client"]), str(r["split"]), int(r["label"])) for r in rows)
    clients = sorted({str(r["client"]) for r in rows})
    header = f"{'client':<9}" + "".join(f"{split + ' 0/1':>13}" for split in SPLITS) + f"{'total':>8}"
    lines = [header]
    for client in clients:
        cells = "".join(f"{counts[client, s, 0]:>9}/{counts[client, s, 1]:<3}" for s in SPLITS)
        total = sum(v for (c, _, _), v in counts.items() if c == client)
        lines.append(f"{client:<9}{cells}{total:>8}")
    lines.append(f"prepared {len(rows)} subjects, skipped {n_skipped} (label 0 = healthy, 1 = diseased)")
    return "\n".join(lines)
