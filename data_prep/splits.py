"""Patient-level train/val/test splits per client, stratified by label, seeded and reproducible."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

SPLITS = ("train", "val", "test")
REFERENCE_TEST_SPLIT = "test_siemens"
"""Extra split of a benchmark root (data_prep/benchmark_cohort.py): every test heart rendered with the Siemens
profile, to measure a model on the same hearts without the site's appearance."""
REFERENCE_SUFFIX = "__siemens"
"""Subject id of a reference rendering: its test subject's id followed by this suffix."""
MANIFEST_SPLITS = (*SPLITS, REFERENCE_TEST_SPLIT)
"""Every value the `split` column of a manifest may hold."""


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """Generator that depends only on the seed and the keys (stable across runs and processes)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def stratum_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes of one stratum: each split gets at least one subject when n >= 3; train never empty."""
    if n <= 0:
        return 0, 0, 0
    if n == 1:
        return 1, 0, 0
    if n == 2:
        return 1, 0, 1
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    while n_val + n_test > n - 1:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def assign_splits(
    subjects: Iterable[tuple[str, str, int]], seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, str]:
    """Map subject id → split from (subject_id, client, label) triples.

    Within each client, each label stratum is shuffled with a seed-derived generator and cut into train/val/test.
    When a client's strata are too small to fill every split, one subject is moved from the largest split into each
    empty one, as long as the client has at least three subjects. Each subject (= patient) gets exactly one split.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"invalid split fractions val={val_fraction}, test={test_fraction}")
    strata: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    seen: set[str] = set()
    for subject_id, client, label in subjects:
        if subject_id in seen:
            raise ValueError(f"subject {subject_id} listed twice")
        seen.add(subject_id)
        strata[client][label].append(subject_id)
    assignment: dict[str, str] = {}
    for client in sorted(strata):
        members: dict[str, list[str]] = {split: [] for split in SPLITS}
        for label in sorted(strata[client]):
            ids = sorted(strata[client][label])
            _rng(seed, client, label).shuffle(ids)
            sizes = stratum_sizes(len(ids), val_fraction, test_fraction)
            start = 0
            for split, size in zip(SPLITS, sizes, strict=True):
                members[split].extend(ids[start : start + size])
                start += size
        if sum(len(ids) for ids in members.values()) >= len(SPLITS):
            for split in SPLITS:
                if not members[split]:
                    donor = max(SPLITS, key=lambda name: len(members[name]))
                    members[split].append(members[donor].pop())
        for split, ids in members.items():
            assignment.update(dict.fromkeys(ids, split))
    return assignment
