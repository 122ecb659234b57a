"""Benchmark cohorts: per-seed prepared roots sharing one fixed test set and its Siemens rendering, resumable,
rendered under the per-frame noise scheme."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import data_prep.benchmark_cohort as benchmark_cohort
from data_prep.benchmark_cohort import (
    TEST_FOLDER,
    BenchmarkCohortSpec,
    build_benchmark_roots,
    draw_folder,
    renders_as_reference,
    settings_draws,
    site_plans,
    subject_id,
)
from data_prep.cohort import STAMP_FILE, volume_digests
from data_prep.datamodule import VendorDataModule
from data_prep.direct import geometry_from_args, prepare_direct
from data_prep.preprocess import read_volume, stored_volume
from data_prep.report import read_manifest, read_prepared, split_counts
from data_prep.splits import REFERENCE_SUFFIX, REFERENCE_TEST_SPLIT
from data_prep.synthesize import SubjectPlan
from data_prep.vendors import PROFILES, REFERENCE_VENDOR
from models.protocol import SITES
from models.standin import prepare_args

SPEC = BenchmarkCohortSpec(
    concept_shift="ge:HCM,HHD=healthy", train_per_site=3, val_per_site=2, test_per_site=6, min_test_healthy=3
)
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Path]]:
    out = tmp_path_factory.mktemp("benchmark")
    return out, build_benchmark_roots(out, SPEC, SEEDS, prepare_args(), workers=2, log=lambda _: None)


@pytest.fixture
def rendered(monkeypatch) -> list[int]:
    """The number of volumes of each `_render_all` call the test makes (each test set draw, then each root)."""
    counts: list[int] = []
    original = benchmark_cohort._render_all
    monkeypatch.setattr(
        benchmark_cohort,
        "_render_all",
        lambda subjects, *args: counts.append(len(subjects)) or original(subjects, *args),
    )
    return counts


def _rows(root: Path) -> list[dict[str, str]]:
    return read_manifest(root / "manifest.csv")


def test_every_root_is_a_prepared_root_with_the_asked_sizes(built) -> None:
    _, roots = built
    assert sorted(roots) == list(SEEDS)
    for root in roots.values():
        record = read_prepared(root)
        assert record["geometry"] == {"crop": [64, 64], "spacing_mm": [3.0, 3.0, 10.0], "depth": 8}
        counts = Counter((row["client"], row["split"]) for row in _rows(root))
        for site in SITES:
            sizes = {split: counts[site, split] for split in ("train", "val", "test", REFERENCE_TEST_SPLIT)}
            assert sizes == {"train": 3, "val": 2, "test": 6, REFERENCE_TEST_SPLIT: 6}
            assert record["counts"][site][REFERENCE_TEST_SPLIT] == 6
            module = VendorDataModule(root, clients=site)
            assert (module.num_train_samples, len(module.rows["val"]), len(module.rows["test"])) == (3, 2, 6)
            assert module.has_split(REFERENCE_TEST_SPLIT)
        assert read_volume(root / _rows(root)[0]["image"]).shape == (2, 64, 64, 8)


def test_the_test_set_is_the_same_files_in_every_root(built) -> None:
    out, roots = built
    tests = [
        {r["subject_id"]: r for r in _rows(root) if r["split"] != "train" and r["split"] != "val"}
        for root in roots.values()
    ]
    assert tests[0].keys() == tests[1].keys()
    for subject, row in tests[0].items():
        inodes = {
            os.stat(root / test[subject]["image"]).st_ino for root, test in zip(roots.values(), tests, strict=True)
        }
        assert inodes == {os.stat(out / TEST_FOLDER / row["image"]).st_ino}, subject


def test_each_test_heart_pairs_with_its_siemens_rendering(built) -> None:
    _, roots = built
    rows = {r["subject_id"]: r for r in _rows(roots[0])}
    tests = [r for r in rows.values() if r["split"] == "test"]
    assert {r["subject_id"] + REFERENCE_SUFFIX for r in tests} == {
        r["subject_id"] for r in rows.values() if r["split"] == REFERENCE_TEST_SPLIT
    }
    for row in tests:
        twin = rows[row["subject_id"] + REFERENCE_SUFFIX]
        assert [twin[k] for k in ("client", "pathology", "label")] == [
            row[k] for k in ("client", "pathology", "label")
        ]
        same = np.array_equal(read_volume(roots[0] / row["image"]), read_volume(roots[0] / twin["image"]))
        linked = os.stat(roots[0] / row["image"]).st_ino == os.stat(roots[0] / twin["image"]).st_ino
        assert same == linked == (row["client"] == "siemens"), row["subject_id"]
        assert twin["source"] == row["source"].replace(f"profile={row['vendor']}", f"profile={REFERENCE_VENDOR}")


def _test_plans(spec: BenchmarkCohortSpec) -> dict[str, SubjectPlan]:
    """The test plans of `spec` by subject id."""
    plans = site_plans(spec.test_seed, spec.test_per_site, spec, spec.min_test_healthy)
    return {subject_id(plan, spec.test_seed): plan for members in plans.values() for plan in members}


def _assert_linked_twins_are_their_rendering(root: Path, spec: BenchmarkCohortSpec, sites: set[str]) -> None:
    """At `sites` each test_siemens volume is its test volume's file and equals rendering it with Siemens' profile."""
    rows = {r["subject_id"]: r for r in _rows(root)}
    plans = _test_plans(spec)
    geometry = geometry_from_args(prepare_args())
    linked = set()
    for name, plan in plans.items():
        own, twin = rows[name], rows[name + REFERENCE_SUFFIX]
        if os.stat(root / own["image"]).st_ino != os.stat(root / twin["image"]).st_ino:
            continue
        linked.add(own["client"])
        rendered = prepare_direct(plan, spec.test_seed, geometry, spec.heterogeneity, REFERENCE_VENDOR, True)
        assert np.array_equal(stored_volume(rendered), read_volume(root / twin["image"])), name
        assert (rendered.n_slices, rendered.crop_method) == (int(twin["n_slices"]), twin["crop_method"])
    assert linked == sites


def test_linked_siemens_renderings_equal_rendering_them(built, tmp_path: Path, rendered: list[int]) -> None:
    """Hard links replace renderings only where they are identical by construction: the Siemens site at any h, every
    site at h = 0 (where the test set renders one volume per heart)."""
    _, roots = built
    _assert_linked_twins_are_their_rendering(roots[0], SPEC, {"siemens"})
    spec = _tiny(0.0)
    (root,) = build_benchmark_roots(tmp_path, spec, [3], prepare_args(), log=lambda _: None).values()
    assert rendered == [8, 12]  # the test set: 2 hearts x 4 sites, each rendered once
    _assert_linked_twins_are_their_rendering(root, spec, set(SITES))


@pytest.mark.parametrize("vendor", sorted(PROFILES))
def test_renders_as_reference_where_the_profiles_agree(vendor: str) -> None:
    plan = SubjectPlan(vendor, "mnms", "NOR", 0)
    assert renders_as_reference(plan, 0.0)
    for heterogeneity in (0.3, 1.0, 1.5):
        assert renders_as_reference(plan, heterogeneity) == (vendor == REFERENCE_VENDOR)


def test_test_sets_hold_enough_healthy_subjects(built) -> None:
    _, roots = built
    healthy = Counter(r["client"] for r in _rows(roots[0]) if r["split"] == "test" and r["label"] == "0")
    assert all(healthy[site] >= SPEC.min_test_healthy for site in SITES)


def test_ids_are_unique_and_training_subjects_are_not_test_subjects(built) -> None:
    _, roots = built
    train_val = {}
    for seed, root in roots.items():
        rows = _rows(root)
        assert len({r["subject_id"] for r in rows}) == len(rows)
        train_val[seed] = {r["subject_id"] for r in rows if r["split"] in ("train", "val")}
        tests = {r["subject_id"] for r in rows if r["split"] == "test"}
        assert not train_val[seed] & tests
    assert not train_val[0] & train_val[1]
    assert len(set(volume_digests(roots[0]).values())) == len(_rows(roots[0])) - 6  # only the Siemens site's twins


def test_concept_shift_relabels_the_site_everywhere(built) -> None:
    _, roots = built
    rows = [r for root in roots.values() for r in _rows(root)]
    shifted = [r for r in rows if " heart=HCM " in r["source"] or " heart=HHD " in r["source"]]
    assert {r["split"] for r in shifted if r["client"] == "ge"} >= {"train", "test"}
    assert all(r["label"] == ("0" if r["client"] == "ge" else "1") for r in shifted)


def test_finished_roots_are_reused_and_unfinished_ones_rebuilt(built, rendered: list[int]) -> None:
    out, roots = built
    before = {seed: os.stat(root / "manifest.csv").st_mtime_ns for seed, root in roots.items()}
    assert build_benchmark_roots(out, SPEC, SEEDS, prepare_args(), log=lambda _: None) == roots
    assert rendered == []
    (roots[1] / STAMP_FILE).unlink()
    digests = volume_digests(roots[1])
    build_benchmark_roots(out, SPEC, SEEDS, prepare_args(), log=lambda _: None)
    assert rendered == [20]  # seed 1's train/val only; the test set and seed 0 were finished
    assert os.stat(roots[0] / "manifest.csv").st_mtime_ns == before[0]
    assert volume_digests(roots[1]) == digests
    stamp = json.loads((roots[0] / STAMP_FILE).read_text(encoding="utf-8"))
    assert stamp.pop("noise") == "per-frame"
    (roots[0] / STAMP_FILE).write_text(json.dumps(stamp), encoding="utf-8")  # as stamped before the noise scheme
    build_benchmark_roots(out, SPEC, SEEDS, prepare_args(), log=lambda _: None)
    assert rendered == [20, 20]


def _tiny(heterogeneity: float) -> BenchmarkCohortSpec:
    return BenchmarkCohortSpec(heterogeneity, train_per_site=2, val_per_site=1, test_per_site=2, min_test_healthy=1)


def test_output_does_not_depend_on_workers_and_other_settings_rebuild(tmp_path: Path, rendered: list[int]) -> None:
    one, two = (
        build_benchmark_roots(tmp_path / str(n), _tiny(0.5), [3], prepare_args(), workers=n, log=lambda _: None)
        for n in (1, 2)
    )
    digests = volume_digests(one[3])
    assert digests == volume_digests(two[3])
    assert [r["label"] for r in _rows(one[3])] == [r["label"] for r in _rows(two[3])]
    rendered.clear()
    build_benchmark_roots(tmp_path / "1", _tiny(1.5), [3], prepare_args(), log=lambda _: None)
    # The test set (2 hearts x 2 renderings x 4 sites, less the Siemens site's 2 linked twins), then the root.
    assert rendered == [14, 12]
    assert volume_digests(one[3]) != digests


def test_subjects_follow_the_seeds_plans(built) -> None:
    _, roots = built
    for seed, root in roots.items():
        rows = _rows(root)
        for splits, plan_seed, per_site, min_healthy in (
            ({"test"}, SPEC.test_seed, 6, 3),
            ({"train", "val"}, seed, 5, 0),
        ):
            plans = site_plans(plan_seed, per_site, SPEC, min_healthy)
            expected = {subject_id(plan, plan_seed) for members in plans.values() for plan in members}
            chosen = [r for r in rows if r["split"] in splits]
            assert {r["subject_id"] for r in chosen} == expected
            assert all(f"seed={plan_seed} " in r["source"] for r in chosen)


def test_iid_sites_mix_every_vendor_at_every_site() -> None:
    spec = BenchmarkCohortSpec(iid_sites=True, concept_shift="canon:HCM=healthy")
    plans = site_plans(5, 40, spec)
    own = site_plans(5, 40, BenchmarkCohortSpec())
    for site in SITES:
        assert len(plans[site]) == 40 and len({p.vendor for p in plans[site]}) >= 3
        assert {p.vendor for p in own[site]} == {site}
        relabelled = [p for p in plans[site] if p.heart != p.pathology]
        assert all(p.heart == "HCM" for p in relabelled) and bool(relabelled) == (site == "canon")
    healthy = [sum(p.heart == "NOR" for p in plans[site]) for site in SITES]
    assert max(healthy) - min(healthy) <= 1


SPEC_ERRORS = {
    "heterogeneity": ({"heterogeneity": 2.0}, "--heterogeneity"),
    "no training subject": ({"train_per_site": 0}, "train_per_site"),
    "too many": ({"test_per_site": 401}, "test_per_site"),
    "all healthy": ({"test_per_site": 10, "min_test_healthy": 10}, "min_test_healthy"),
    "concept shift": ({"concept_shift": "ge:HCM=diseased"}, "=diseased"),
    "no test draw": ({"test_draws": 0}, "test_draws"),
}


@pytest.mark.parametrize(("fields", "message"), SPEC_ERRORS.values(), ids=SPEC_ERRORS)
def test_bad_specs_are_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchmarkCohortSpec(**fields)


@pytest.mark.parametrize("seeds", [[10_000], [1, 1], [10_001]])
def test_seeds_must_differ_from_each_other_and_the_test_draws_seeds(seeds: list[int], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test draws' seeds"):
        build_benchmark_roots(tmp_path, replace(SPEC, test_draws=2), seeds, prepare_args())
    assert not any(tmp_path.iterdir())


def test_a_second_test_draw_adds_subjects_and_leaves_the_first_as_it_was(
    built, tmp_path: Path, rendered: list[int]
) -> None:
    """A later draw is rendered alone from the next test seed; the first draw's folder is the one-draw cohort's, whose
    stamp (and records) predate draws: settings omit test_draws = 1."""
    out, roots = built
    assert "test_draws" not in SPEC.settings() and settings_draws(SPEC.settings()) == 1
    first = volume_digests(out / TEST_FOLDER)
    for name in (TEST_FOLDER, *(root.name for root in roots.values())):
        shutil.copytree(out / name, tmp_path / name, copy_function=os.link)
    spec = replace(SPEC, test_draws=2)
    assert settings_draws(spec.settings()) == 2 and spec.test_seeds == (SPEC.test_seed, SPEC.test_seed + 1)
    two = build_benchmark_roots(tmp_path, spec, SEEDS, prepare_args(), log=lambda _: None)
    # the new draw (6 hearts x 2 renderings x 4 sites, less the Siemens site's 6 linked twins), then both roots
    assert rendered == [42, 20, 20]
    assert volume_digests(draw_folder(tmp_path, 0)) == first
    draw = spec.draw(1)
    assert draw.test_seed == SPEC.test_seed + 1 and draw.test_draws == 1
    expected = set(_test_plans(draw))
    assert {r["subject_id"] for r in _rows(draw_folder(tmp_path, 1)) if r["split"] == "test"} == expected
    for root in two.values():
        rows = _rows(root)
        tests = {r["subject_id"] for r in rows if r["split"] == "test"}
        assert tests == set(_test_plans(SPEC)) | expected
        assert read_prepared(root)["counts"]["ge"]["test"] == spec.test_subjects_per_site == 12


@pytest.mark.parametrize(
    ("train_val", "test", "message"),
    [(["a"], ["a"], "also test ids"), (["a", "a"], ["b"], "train/val subject ids"), ([], ["b", "b"], "test subject")],
)
def test_id_check(train_val: list[str], test: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        benchmark_cohort._check_ids(0, train_val, test)
    benchmark_cohort._check_ids(0, ["a"], ["b"])


def test_split_counts_accept_the_reference_split_only() -> None:
    rows = [{"client": "ge", "split": "test", "label": 0}, {"client": "ge", "split": REFERENCE_TEST_SPLIT, "label": 0}]
    assert split_counts(rows)["ge"][REFERENCE_TEST_SPLIT] == 1
    with pytest.raises(ValueError, match="field split is 'holdout'"):
        split_counts([{"client": "ge", "split": "holdout", "label": 1, "subject_id": "x"}])
