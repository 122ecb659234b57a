"""Helpers shared by the readers: file listing, CSV reading by column name, field parsing, per-root matching."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from data_prep.records import FrameRef, InputError, SubjectRecord

RootReader = Callable[[Path, list[Path]], tuple[list[SubjectRecord], list[InputError]]]
"""Reads the subjects of one root: (its metadata CSV, the subject images below it) -> (records, problems)."""


def list_files(root: Path) -> list[Path]:
    """Every file under `root`, at any depth, sorted (hidden files and partial outputs skipped).

    Symbolic links to folders are listed as folders but not entered (os.walk's default), so a link loop cannot hang
    the search; a link to a file, even dangling or looping, is listed and reported when a reader needs it.
    """
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(Path(folder) / name for name in names if not name.startswith("."))
    return sorted(found)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and non-empty rows of a CSV (Excel padding rows such as `,,,,` dropped), each row a dict by column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            rows = []
            for values in reader:
                if not any(value.strip() for value in values):
                    continue
                padded = values + [""] * (len(header) - len(values))
                rows.append({name: value.strip() for name, value in zip(header, padded, strict=False) if name})
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"unreadable CSV ({type(error).__name__}: {error})") from error
    return header, rows


def require_columns(path: Path, header: list[str], names: tuple[str, ...]) -> None:
    """Raise InputError naming the first required column missing from `header`."""
    for name in names:
        if name not in header:
            raise InputError(path, f"missing column {name!r} (columns found: {', '.join(h for h in header if h)})")


def parse_int(path: Path, value: str, field: str) -> int:
    """Parse an integer field (`12` or `12.0`); anything else raises InputError naming the field."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        raise InputError(path, f"field {field} is not an integer: {value!r}") from None
    if not number.is_integer():
        raise InputError(path, f"field {field} is not an integer: {value!r}")
    return int(number)


def check_ed_es(path: Path, ed: int, es: int, field: str) -> None:
    """ED and ES must be different frames."""
    if ed == es:
        raise InputError(path, f"ED equals ES ({field}: both {ed})")


def under(path: Path, root: Path) -> bool:
    """True when `path` lies inside folder `root`."""
    return path.is_relative_to(root)


def present(path: Path) -> bool:
    """True when a file or a symbolic link (even dangling or looping) has this name: it is then read and checked."""
    return os.path.lexists(path) and not path.is_dir()


def label_if_present(path: Path, label_map: Mapping[int, int] | None = None) -> FrameRef | None:
    """A reference to the label file `path` when it is present (labels are optional), else None."""
    return FrameRef(path, label_map=label_map) if present(path) else None


def find_per_root(
    images: list[Path], csv_paths: Iterable[Path], read_root: RootReader, orphan_reason: str
) -> tuple[list[SubjectRecord], list[InputError]]:
    """Read each metadata CSV with the images below its folder; images below no CSV are reported as `orphan_reason`.

    A root whose CSV is unusable is reported as one problem and the other roots are still read.
    """
    records: list[SubjectRecord] = []
    problems: list[InputError] = []
    claimed: set[Path] = set()
    for csv_path in csv_paths:
        root_images = [image for image in images if under(image, csv_path.parent)]
        claimed.update(root_images)
        try:
            found, issues = read_root(csv_path, root_images)
        except InputError as error:
            problems.append(error)
            continue
        records.extend(found)
        problems.extend(issues)
    problems.extend(InputError(image, orphan_reason) for image in images if image not in claimed)
    return records, problems
