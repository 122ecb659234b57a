"""The benchmark's prepared roots: per seed, train/val subjects of every site from that seed and one fixed test set
(with its Siemens rendering), built with the direct path in parallel, deterministic and resumable.

Layout under `out`: `test_set/` (the test volumes of the first draw, rendered once), `test_set_draw<k>/` for each
further draw k, and `seed_<S>/` per seed, a normal prepared root (manifest.csv, prepared.json, skipped.csv,
volumes/<site>/...) whose test volumes are hard links into the draws' folders.
A finished folder holds `cohort_settings.json`, written last; a folder without it, or with other settings, is rebuilt.

Subjects are rendered under the per-frame noise scheme (`prepare_direct(..., frame_noise=True)`): each cine frame's
noise comes from its own generator, so the ED and ES frames cost two frames' noise, not the whole cine's. The default
synthesizer keeps one generator per subject, bit-compatible with earlier cohorts (e.g. the stand-in's pretraining
cohort); hence the same seed gives the same hearts and acquisitions here but other noise. A test heart whose Siemens
rendering is its own by construction (the same profile: the Siemens vendor at any heterogeneity, every vendor at 0)
is rendered once and its test_siemens volume hard-linked to it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.cohort import STAMP_FILE
from data_prep.direct import geometry_from_args, prepare_direct
from data_prep.prepare import VOLUME_FOLDER, geometry_fields, write_prepared
from data_prep.preprocess import Geometry, write_volume
from data_prep.records import LabelRule
from data_prep.report import MANIFEST_COLUMNS, read_manifest, write_csv_atomic, write_skipped
from data_prep.splits import REFERENCE_SUFFIX, REFERENCE_TEST_SPLIT
from data_prep.synthesize import ConceptShift, SubjectPlan, parse_concept_shifts, plan_cohort, shifted
from data_prep.vendors import REFERENCE_VENDOR, check_heterogeneity, largest_remainder, profile_at
from models.atomic_io import write_json_atomic
from models.protocol import SITES

SCHEMA = "med-duallora/benchmark-cohort/1"
NOISE_SCHEME = "per-frame"
"""Stamped with the settings: folders rendered under the one-generator scheme (unstamped) are rebuilt."""
TEST_FOLDER = "test_set"
"""The first test draw's folder; draw k > 0 is in `test_set_draw<k>`."""
ROOT_PREFIX = "seed_"
MAX_PER_SITE = 400
"""data_prep.synthesize's limit on subjects per vendor (3-digit M&Ms-2 ids)."""
Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchmarkCohortSpec:
    """What every root of one benchmark holds (see the module docstring and docs/synthetic-cohort.md §9).

    `concept_shift` takes ConceptShift objects or `SITE:CODES=healthy` strings (one or several); it is stored as a
    tuple of ConceptShift. The fixed test set is `test_draws` independent draws, each of `test_per_site` subjects per
    site with at least `min_test_healthy` healthy, draw k from seed `test_seed + k`: the synthesizer's ids cap one
    draw at MAX_PER_SITE, and a later draw adds subjects without changing the earlier ones.
    """

    heterogeneity: float = 1.0
    iid_sites: bool = False
    concept_shift: ConceptShift | str | Sequence[ConceptShift | str] | None = None
    train_per_site: int = 40
    val_per_site: int = 40
    test_per_site: int = 300
    min_test_healthy: int = 90
    test_seed: int = 10_000
    test_draws: int = 1

    def __post_init__(self) -> None:
        check_heterogeneity(self.heterogeneity)
        object.__setattr__(self, "concept_shift", parse_concept_shifts(self.concept_shift))
        for name in ("train_per_site", "val_per_site", "test_per_site"):
            if not 1 <= getattr(self, name) <= MAX_PER_SITE:
                raise ValueError(
                    f"BenchmarkCohortSpec.{name} = {getattr(self, name)}: must lie in [1, {MAX_PER_SITE}]"
                )
        if self.train_per_site + self.val_per_site > MAX_PER_SITE:
            raise ValueError(f"BenchmarkCohortSpec: train_per_site + val_per_site must be at most {MAX_PER_SITE}")
        if self.test_draws < 1:
            raise ValueError(f"BenchmarkCohortSpec.test_draws = {self.test_draws}: must be at least 1")
        if not 0 <= self.min_test_healthy < self.test_per_site:
            raise ValueError(
                f"BenchmarkCohortSpec.min_test_healthy = {self.min_test_healthy}: must lie in "
                f"[0, test_per_site = {self.test_per_site}) (the test set needs diseased subjects too)"
            )

    @property
    def shifts(self) -> tuple[ConceptShift, ...]:
        """The concept shifts (parsed into a tuple by __post_init__)."""
        return tuple(self.concept_shift)

    @property
    def test_seeds(self) -> tuple[int, ...]:
        """The generator seed of each test draw."""
        return tuple(self.test_seed + draw for draw in range(self.test_draws))

    @property
    def test_subjects_per_site(self) -> int:
        return self.test_per_site * self.test_draws

    def draw(self, number: int) -> BenchmarkCohortSpec:
        """The one-draw spec of test draw `number` (its test seed; the rest unchanged)."""
        return replace(self, test_seed=self.test_seeds[number], test_draws=1)

    def settings(self) -> dict[str, object]:
        """JSON form (concept shifts as `SITE:CODES=healthy` strings), as stamped into finished folders and records.

        A one-draw spec omits `test_draws`: its stamp is the one written before draws existed, so folders and
        records made then stay valid (settings_draws reads the omission as 1).
        """
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        if self.test_draws == 1:
            del values["test_draws"]
        return {**values, "concept_shift": [str(shift) for shift in self.shifts]}


def settings_draws(settings: Mapping[str, Any]) -> int:
    """The number of test draws of stamped BenchmarkCohortSpec settings (1 where the field is omitted)."""
    return int(settings.get("test_draws", 1))


@dataclass(frozen=True)
class _Subject:
    """One volume to render: the plan, its generator seed, where it goes and how it is rendered."""

    plan: SubjectPlan
    seed: int
    site: str
    split: str
    subject_id: str
    render_profile: str | None


def subject_id(plan: SubjectPlan, seed: int) -> str:
    """`s<seed>_<dataset>_<id>`: the generator seed keeps the ids of different seeds' cohorts apart."""
    return f"s{seed}_{plan.dataset}_{plan.pid}"


def site_plans(
    seed: int, per_site: int, spec: BenchmarkCohortSpec, min_healthy: int = 0
) -> dict[str, list[SubjectPlan]]:
    """`per_site` plans per site drawn from `seed` (at least `min_healthy` healthy hearts per vendor), recorded codes
    as seen at their site (concept shifts applied).

    By default a site's subjects are its vendor's, planned as data_prep.synthesize plans them (appearance and class
    mix at the spec's heterogeneity). With `iid_sites`, the four vendors' plans are pooled and dealt to the sites at
    random, stratified by label: every site gets the same mix of vendors, datasets and codes in distribution (the
    negative control); concept shifts then follow the site a subject was dealt to.
    """
    if not spec.iid_sites:
        plans = plan_cohort(seed, per_site, SITES, spec.heterogeneity, spec.shifts, min_healthy)
        return {site: [plan for plan in plans if plan.vendor == site] for site in SITES}
    plans = plan_cohort(seed, per_site, SITES, spec.heterogeneity, (), min_healthy)
    rng = np.random.default_rng([seed, 3])
    dealt = [plan for label in (0, 1) for plan in _shuffled(plans, label, rng)]
    by_site = {site: dealt[number :: len(SITES)] for number, site in enumerate(SITES)}
    return {site: [shifted(plan, site, spec.shifts) for plan in members] for site, members in by_site.items()}


def _label(plan: SubjectPlan) -> int:
    """The binary label the readers give the plan's recorded code (LabelRule's default: NOR 0, else 1)."""
    return LabelRule().code_and_label(plan.dataset, plan.pathology, "synthetic plan", "pathology")[1]


def _shuffled(plans: Sequence[SubjectPlan], label: int, rng: np.random.Generator) -> list[SubjectPlan]:
    """The plans of one label, in an order drawn from `rng`."""
    members = [plan for plan in plans if _label(plan) == label]
    return [members[i] for i in rng.permutation(len(members))]


def train_val(plans: Sequence[SubjectPlan], n_train: int, seed: int, site: str) -> dict[str, list[SubjectPlan]]:
    """A site's plans cut into train (`n_train`) and val (the rest), stratified by label, shuffled with `seed`."""
    rng = np.random.default_rng([seed, 4, SITES.index(site)])
    strata = {label: _shuffled(plans, label, rng) for label in (0, 1)}
    train_counts = largest_remainder(n_train, {str(label): float(len(members)) for label, members in strata.items()})
    splits: dict[str, list[SubjectPlan]] = {"train": [], "val": []}
    for label, members in strata.items():
        splits["train"] += members[: train_counts[str(label)]]
        splits["val"] += members[train_counts[str(label)] :]
    return splits


def _worker_init() -> None:
    """One intra-op thread per worker process: parallelism comes from the processes."""
    torch.set_num_threads(1)


def _subject_fields(subject: _Subject) -> dict[str, object]:
    """The manifest fields that come from the subject and how it is rendered, not from its volume."""
    plan = subject.plan
    profile = subject.render_profile or plan.vendor
    return {
        "subject_id": subject.subject_id,
        "dataset": plan.dataset,
        "vendor": plan.vendor,
        "client": subject.site,
        "split": subject.split,
        "pathology": plan.pathology,
        "label": _label(plan),
        "image": (Path(VOLUME_FOLDER) / subject.site / f"{subject.subject_id}.nii.gz").as_posix(),
        "layout": "raw",
        "centre": "",
        "source": f"synthetic seed={subject.seed} index={plan.index} heart={plan.heart} profile={profile}",
    }


def _render(task: tuple[_Subject, Path, Geometry, float]) -> dict[str, object]:
    """Prepare one subject with the direct path (per-frame noise), write its volume under `root`; returns its
    manifest row."""
    subject, root, geometry, heterogeneity = task
    prepared = prepare_direct(
        subject.plan, subject.seed, geometry, heterogeneity, subject.render_profile, frame_noise=True
    )
    row = _subject_fields(subject)
    write_volume(prepared, root / str(row["image"]))
    sx, sy, sz = prepared.original_spacing
    return {
        **row,
        "n_slices": prepared.n_slices,
        "orig_spacing_x": round(sx, 4),
        "orig_spacing_y": round(sy, 4),
        "orig_spacing_z": round(sz, 4),
        "crop_method": prepared.crop_method,
    }


def _render_all(
    subjects: Sequence[_Subject], root: Path, geometry: Geometry, heterogeneity: float, workers: int
) -> list[dict[str, object]]:
    """Manifest rows of `subjects`, rendered by up to `workers` forked processes (output independent of it)."""
    tasks = [(subject, root, geometry, heterogeneity) for subject in subjects]
    if workers <= 1:
        _worker_init()
        return [_render(task) for task in tasks]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as executor:
        return list(executor.map(_render, tasks, chunksize=4))


def _finished(folder: Path, settings: dict[str, object]) -> bool:
    """Whether `folder` holds a settings stamp (written last) equal to `settings`."""
    stamp = folder / STAMP_FILE
    return stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == settings


def renders_as_reference(plan: SubjectPlan, heterogeneity: float) -> bool:
    """Whether the plan's own rendering at `heterogeneity` is its REFERENCE_VENDOR rendering by construction: same
    plan and seed, and profiles equal in every field but the name, which rendering never reads (the Siemens vendor
    at any heterogeneity; every vendor at 0, where `profile_at` gives the reference's values exactly)."""
    reference = profile_at(REFERENCE_VENDOR, heterogeneity)
    return replace(profile_at(plan.vendor, heterogeneity), name=reference.name) == reference


def _fixed_test_subjects(spec: BenchmarkCohortSpec) -> tuple[list[_Subject], list[tuple[_Subject, _Subject]]]:
    """The fixed test set: `test_per_site` plans per site from `test_seed` with at least `min_test_healthy` healthy,
    each also rendered with the Siemens profile (split test_siemens, id + REFERENCE_SUFFIX).

    Returns the subjects to render and (Siemens rendering, test subject) pairs whose Siemens rendering is the test
    subject's own volume by construction (`renders_as_reference`): those are hard-linked, not rendered twice.
    """
    rendered, linked = [], []
    for site, plans in site_plans(spec.test_seed, spec.test_per_site, spec, spec.min_test_healthy).items():
        for plan in plans:
            name = subject_id(plan, spec.test_seed)
            own = _Subject(plan, spec.test_seed, site, "test", name, None)
            reference = name + REFERENCE_SUFFIX
            twin = _Subject(plan, spec.test_seed, site, REFERENCE_TEST_SPLIT, reference, REFERENCE_VENDOR)
            rendered.append(own)
            if renders_as_reference(plan, spec.heterogeneity):
                linked.append((twin, own))
            else:
                rendered.append(twin)
    return rendered, linked


def _settings(spec: BenchmarkCohortSpec, geometry: Geometry) -> dict[str, object]:
    """The settings stamped into a finished folder (a root adds its seed)."""
    return {"schema": SCHEMA, "spec": spec.settings(), "geometry": geometry_fields(geometry), "noise": NOISE_SCHEME}


def draw_folder(out: Path, draw: int) -> Path:
    """The folder of test draw `draw` under a benchmark cohort's `out`."""
    return Path(out) / (TEST_FOLDER if draw == 0 else f"{TEST_FOLDER}_draw{draw}")


def _build_test_set(folder: Path, spec: BenchmarkCohortSpec, geometry: Geometry, workers: int, log: Log) -> None:
    """Render one test draw (a one-draw `spec`) into `folder` (volumes and manifest.csv), unless a finished one with
    these settings is."""
    settings = _settings(spec, geometry)
    if _finished(folder, settings):
        return
    shutil.rmtree(folder, ignore_errors=True)
    subjects, linked = _fixed_test_subjects(spec)
    log(
        f"benchmark cohort: rendering the test set ({len(subjects)} volumes, {len(linked)} identical Siemens "
        f"renderings linked) into {folder}"
    )
    rows = _render_all(subjects, folder, geometry, spec.heterogeneity, workers)
    by_id = {row["subject_id"]: row for row in rows}
    for twin, own in linked:
        row = {**by_id[own.subject_id], **_subject_fields(twin)}
        os.link(folder / str(by_id[own.subject_id]["image"]), folder / str(row["image"]))
        rows.append(row)
    write_csv_atomic(folder / "manifest.csv", MANIFEST_COLUMNS, rows)
    write_json_atomic(folder / STAMP_FILE, settings)


def _build_root(
    root: Path,
    seed: int,
    spec: BenchmarkCohortSpec,
    geometry: Geometry,
    test_folders: Sequence[Path],
    workers: int,
    log: Log,
) -> None:
    """One seed's prepared root, unless a finished one with these settings is there."""
    settings = {**_settings(spec, geometry), "seed": seed}
    if _finished(root, settings):
        return
    shutil.rmtree(root, ignore_errors=True)
    per_site = spec.train_per_site + spec.val_per_site
    subjects = [
        _Subject(plan, seed, site, split, subject_id(plan, seed), None)
        for site, plans in site_plans(seed, per_site, spec).items()
        for split, members in train_val(plans, spec.train_per_site, seed, site).items()
        for plan in members
    ]
    test_rows = [(folder, row) for folder in test_folders for row in read_manifest(folder / "manifest.csv")]
    _check_ids(seed, [s.subject_id for s in subjects], [str(row["subject_id"]) for _, row in test_rows])
    log(f"benchmark cohort: seed {seed}: rendering {len(subjects)} train/val volumes into {root}")
    rows = _render_all(subjects, root, geometry, spec.heterogeneity, workers)
    for folder, row in test_rows:
        (root / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        os.link(folder / row["image"], root / row["image"])
        rows.append(dict(row))
    rows.sort(key=lambda r: (str(r["client"]), str(r["subject_id"])))
    write_csv_atomic(root / "manifest.csv", MANIFEST_COLUMNS, rows)
    write_skipped(root / "skipped.csv", [])
    total = per_site + spec.test_subjects_per_site
    fractions = (spec.val_per_site / total, spec.test_subjects_per_site / total)
    write_prepared(root, rows, geometry, LabelRule(), seed, fractions)
    write_json_atomic(root / STAMP_FILE, settings)


def _check_ids(seed: int, train_val_ids: Sequence[str], test_ids: Sequence[str]) -> None:
    """ValueError unless the ids of the root are unique and no train/val id is a test id."""
    shared = sorted(set(train_val_ids) & set(test_ids))
    if shared:
        raise ValueError(f"benchmark root of seed {seed}: train/val subject ids {shared[:5]} are also test ids")
    for name, ids in (("train/val", train_val_ids), ("test", test_ids)):
        repeated = sorted(key for key, count in Counter(ids).items() if count > 1)
        if repeated:
            raise ValueError(f"benchmark root of seed {seed}: {name} subject ids {repeated[:5]} are not unique")


def build_benchmark_roots(
    out: Path,
    spec: BenchmarkCohortSpec,
    seeds: Sequence[int],
    geometry_args: Sequence[str],
    workers: int = 2,
    log: Log = print,
) -> dict[int, Path]:
    """One prepared root per seed under `out` (`seed_<S>/`), sharing the test set of `spec.test_seeds`.

    Every root holds, for every site, `train_per_site` train and `val_per_site` val subjects drawn from its seed, the
    same test subjects (ids and volumes, hard links into the test draws' folders, draw_folder) and their Siemens
    renderings (split
    test_siemens). `geometry_args` are data_prep.prepare geometry options (e.g. models.standin.prepare_args()).
    Finished folders are reused; the output does not depend on `workers`.
    """
    geometry = geometry_from_args(geometry_args)
    seeds = list(seeds)
    if len(set(seeds)) < len(seeds) or set(spec.test_seeds) & set(seeds):
        raise ValueError(
            f"seeds {seeds}: must be distinct and differ from the test draws' seeds {list(spec.test_seeds)} (the "
            "test_seed and the next test_draws - 1; a seed equal to one would draw its test hearts again for training)"
        )
    folders = [draw_folder(out, draw) for draw in range(spec.test_draws)]
    for draw, folder in enumerate(folders):
        _build_test_set(folder, spec.draw(draw), geometry, workers, log)
    roots = {}
    for seed in seeds:
        roots[seed] = Path(out) / f"{ROOT_PREFIX}{seed}"
        _build_root(roots[seed], seed, spec, geometry, folders, workers, log)
    return roots
