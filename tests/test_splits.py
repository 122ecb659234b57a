"""Splits: no leakage, stratification by label within each client, determinism, tiny clients, the prepared manifest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from data_prep.report import read_manifest
from data_prep.splits import SPLITS, assign_splits, stratum_sizes


def _cohort() -> list[tuple[str, str, int]]:
    subjects = []
    for client, (healthy, diseased) in {"siemens": (9, 31), "philips": (20, 20), "canon": (1, 4)}.items():
        subjects += [(f"{client}_h{i}", client, 0) for i in range(healthy)]
        subjects += [(f"{client}_d{i}", client, 1) for i in range(diseased)]
    return subjects


def test_each_subject_gets_exactly_one_split() -> None:
    subjects = _cohort()
    splits = assign_splits(subjects, seed=3)
    assert set(splits) == {s for s, _, _ in subjects}
    assert set(splits.values()) == set(SPLITS)


def test_stratified_by_label_within_each_client() -> None:
    splits = assign_splits(_cohort(), seed=3)
    counts = Counter((client, label, splits[s]) for s, client, label in _cohort())
    for client, label, n in (("siemens", 0, 9), ("siemens", 1, 31), ("philips", 0, 20), ("philips", 1, 20)):
        assert tuple(counts[client, label, split] for split in SPLITS) == stratum_sizes(n, 0.2, 0.2)
    assert stratum_sizes(31, 0.2, 0.2) == (19, 6, 6) and stratum_sizes(9, 0.2, 0.2) == (5, 2, 2)


def test_same_seed_same_splits_other_seed_differs() -> None:
    assert assign_splits(_cohort(), seed=7) == assign_splits(list(reversed(_cohort())), seed=7)
    assert assign_splits(_cohort(), seed=7) != assign_splits(_cohort(), seed=8)


def test_tiny_clients_still_fill_every_split() -> None:
    three = [("a", "ge", 1), ("b", "ge", 1), ("c", "ge", 0)]
    assert sorted(assign_splits(three, seed=0).values()) == ["test", "train", "val"]
    two = [("a", "ge", 1), ("b", "ge", 0)]
    assert sorted(assign_splits(two, seed=0).values()) == ["train", "train"]
    assert stratum_sizes(1, 0.2, 0.2) == (1, 0, 0) and stratum_sizes(3, 0.2, 0.2) == (1, 1, 1)


def test_bad_input_to_splits_is_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        assign_splits([("a", "ge", 1), ("a", "ge", 1)], seed=0)
    with pytest.raises(ValueError, match="fractions"):
        assign_splits([("a", "ge", 1)], seed=0, val_fraction=0.6, test_fraction=0.5)


def test_prepared_manifest_has_every_split_for_every_vendor(prepared_root: Path) -> None:
    rows = read_manifest(prepared_root / "manifest.csv")
    assert {(r["client"], r["split"]) for r in rows} == {
        (client, split) for client in ("siemens", "philips", "ge", "canon") for split in SPLITS
    }
    assert len({r["subject_id"] for r in rows}) == len(rows)
    for client in ("siemens", "philips", "ge", "canon"):
        assert {r["label"] for r in rows if r["client"] == client and r["split"] == "train"} == {"0", "1"}
