"""Atomic CSV outputs (manifest.csv, skipped.csv) and the end-of-run summary (client × split × label counts)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Sequence
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
    """Rows of a manifest.csv as dicts of strings."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


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
