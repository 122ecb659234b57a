"""The prepared roots of one benchmark cohort (one per seed) and the `{seed}` pattern the sites are given."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from data_prep.benchmark_cohort import ROOT_PREFIX, BenchmarkCohortSpec, build_benchmark_roots
from data_prep.cohort import assert_disjoint_from_standin
from models.protocol import SEED_PLACEHOLDER
from models.standin import prepare_args


def cohort_data(
    out: Path, spec: BenchmarkCohortSpec, seeds: Sequence[int], workers: int, log: Callable[[str], None] = print
) -> str:
    """Build (or reuse) the cohort's prepared roots in `out`, one per seed, at the stand-in's input geometry, each
    checked to share no subject with the stand-in's pretraining cohort; returns the `$MED_DUALLORA_DATA` pattern
    naming every seed's root (`<out>/seed_{seed}`)."""
    roots = build_benchmark_roots(out, spec, seeds, prepare_args(), workers=workers, log=log)
    for root in roots.values():
        assert_disjoint_from_standin(root)
    pattern = str(Path(out) / f"{ROOT_PREFIX}{SEED_PLACEHOLDER}")
    for seed, root in roots.items():
        if str(root) != pattern.replace(SEED_PLACEHOLDER, str(seed)):
            raise RuntimeError(f"{root}: not at {pattern} (data_prep.benchmark_cohort changed its layout)")
    return pattern
