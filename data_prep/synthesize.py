"""`python -m data_prep.synthesize`: a deterministic multi-vendor synthetic cohort in the real ACDC / M&Ms layouts.

`--subjects-per-vendor N` subjects per vendor, split over datasets as the real open data (siemens = ACDC + M&Ms-1 A +
M&Ms-2 SIEMENS, philips = M&Ms-1 B + M&Ms-2 Philips, ge = M&Ms-1 C + M&Ms-2 GE, canon = M&Ms-1 D), with per-vendor
class mixes from the real counts (data_prep/vendors.py, docs/synthetic-cohort.md). Output:
RAW/ACDC/database/{training,testing}/patientNNN/..., RAW/MnM/OpenDataset/..., RAW/MnM2/....
`--heterogeneity h` moves every vendor's appearance and class mix towards Siemens' look and the pooled mix (h = 0)
or beyond the real ones (h up to 1.5); `--concept-shift SITE:CODES=healthy` records those hearts at that site as NOR.
`--frame-noise` draws each cine frame's noise from its own generator (the benchmark cohorts' scheme) instead of the
subject's main generator (the default, bit-compatible with earlier cohorts).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from data_prep.anatomy import HeartParams, sample_heart
from data_prep.layouts import (
    Appearance,
    axis_aligned_affine,
    four_chamber_affine,
    oblique_affine,
    write_acdc,
    write_csv,
    write_mnms,
    write_mnms2,
)
from data_prep.phantom import Acquisition, FrameNoise, render_four_chamber, render_sax, sample_acquisition
from data_prep.records import KNOWN_CODES
from data_prep.vendors import (
    DATASET_SHARES,
    MNMS2_TEST_ONLY_CODES,
    MNMS2_VENDOR_FIELDS,
    MNMS_FOLDERS,
    MNMS_TRAINING_CODES,
    MNMS_VENDOR_FIELDS,
    PROFILES,
    VendorProfile,
    check_heterogeneity,
    class_mix_at,
    largest_remainder,
    profile_at,
)
from models.protocol import SITES

DEFAULT_SUBJECTS_PER_VENDOR = 20
MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS_COLUMNS = ("", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex")
MNMS2_COLUMNS = ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD")
ACDC_BLOCKS = {"DCM": 1, "HCM": 21, "MINF": 41, "NOR": 61, "RV": 81}
ACDC_BLOCK_SIZE = 20
"""Training ids per group block (patient001-020 DCM, ...); further subjects of a group go to testing."""
FRAMES = {"acdc": (12, 20), "mnms": (18, 20), "mnms2": (18, 20)}
HEART_ANGLE = {"acdc": np.pi / 2, "mnms": np.pi / 3, "mnms2": 2 * np.pi / 3}
NON_ORTHONORMAL_FRACTION = 0.3
MNMS2_PADDING_ROWS = 8
HEALTHY_CODE = "NOR"
CONCEPT_SHIFT_SYNTAX = "SITE:CODE[,CODE...]=healthy, e.g. ge:HCM,HHD=healthy"
NOISE_STREAMS = {"sax": 5, "lax": 6}
"""Second seed word of the per-frame noise generators, (seed, stream, index, frame) per cine view. Words 0-4 seed
the plan, a subject's main and auxiliary generators and data_prep.benchmark_cohort's dealing and splits; they are
avoided because numpy seeds a key like (seed, 3) and (seed, 3, 0, 0) alike."""


@dataclass(frozen=True)
class SubjectPlan:
    """One synthetic subject: where it goes and what it has; `index` seeds its own generator.

    `pathology` is the code recorded in the files (hence the readers' code and label); `heart` is the code whose
    anatomy is drawn (the same unless a concept shift recorded the heart as healthy).
    """

    vendor: str
    dataset: str
    pathology: str
    index: int
    pid: str = ""
    folder: str = ""
    heart: str = ""

    def __post_init__(self) -> None:
        if not self.heart:
            object.__setattr__(self, "heart", self.pathology)


@dataclass(frozen=True)
class ConceptShift:
    """`--concept-shift SITE:CODES=healthy`: at `site`, hearts of `codes` are recorded as healthy (NOR, label 0);
    their anatomy stays that of the code."""

    site: str
    codes: frozenset[str]

    def __str__(self) -> str:
        return f"{self.site}:{','.join(sorted(self.codes))}=healthy"

    @classmethod
    def parse(cls, text: str) -> ConceptShift:
        """Parse `SITE:CODE[,CODE...]=healthy`; ValueError naming --concept-shift on bad syntax or unknown names.

        `=diseased` is refused: the layouts record a pathology code, not a label, so recording a healthy heart as
        diseased would need an invented disease code per dataset (and a disease no anatomy shows).
        """
        where = f"--concept-shift {text!r}"
        site, colon, rule = text.partition(":")
        codes_text, equals, target = rule.partition("=")
        if not colon or not equals:
            raise ValueError(f"{where}: expected {CONCEPT_SHIFT_SYNTAX}")
        if site not in SITES:
            raise ValueError(f"{where}: unknown site {site!r}; choose one of {', '.join(SITES)}")
        if target == "diseased":
            raise ValueError(
                f"{where}: =diseased is not supported: the layouts record a pathology code, not a label, so a healthy "
                "heart recorded as diseased would need an invented disease code; relabel disease codes =healthy"
            )
        if target != "healthy":
            raise ValueError(f"{where}: unknown rule target {target!r}; expected {CONCEPT_SHIFT_SYNTAX}")
        codes = [code.strip() for code in codes_text.split(",")]
        disease_codes = frozenset().union(*KNOWN_CODES.values()) - {HEALTHY_CODE}
        unknown = [code for code in codes if code not in disease_codes]
        if unknown:
            raise ValueError(
                f"{where}: {unknown} are not disease codes; choose from {', '.join(sorted(disease_codes))}"
            )
        return cls(site, frozenset(codes))


def parse_concept_shifts(values: Iterable[str | ConceptShift] | str | ConceptShift | None) -> tuple[ConceptShift, ...]:
    """Concept shifts from option values or ConceptShift objects (None = none), at most one per site."""
    if values is None:
        return ()
    items = [values] if isinstance(values, str | ConceptShift) else list(values)
    shifts = tuple(item if isinstance(item, ConceptShift) else ConceptShift.parse(item) for item in items)
    sites = [shift.site for shift in shifts]
    twice = sorted({site for site in sites if sites.count(site) > 1})
    if twice:
        raise ValueError(f"--concept-shift: site(s) {twice} given twice; list all of a site's codes in one rule")
    return shifts


def shifted(plan: SubjectPlan, site: str, shifts: Sequence[ConceptShift]) -> SubjectPlan:
    """`plan` with its recorded code as seen at `site`: NOR when a concept shift there names its heart's code."""
    if any(shift.site == site and plan.heart in shift.codes for shift in shifts):
        return replace(plan, pathology=HEALTHY_CODE)
    return plan


def _tie_broken_counts(total: int, weights: dict[str, float], rng: np.random.Generator) -> dict[str, int]:
    """Largest-remainder counts with ties broken by the seeded generator (not by key order)."""
    keys = list(weights)
    order = [keys[i] for i in rng.permutation(len(keys))]
    counts = largest_remainder(total, {key: weights[key] for key in order})
    return {key: counts[key] for key in keys}


def plan_vendor(
    vendor: str, n_subjects: int, rng: np.random.Generator, heterogeneity: float = 1.0, min_healthy: int = 0
) -> list[SubjectPlan]:
    """Dataset and pathology of each subject of one vendor (class mix at `heterogeneity`); both labels present
    whenever n_subjects >= 2; at least `min_healthy` healthy (randomly chosen diseased subjects made healthy)."""
    per_dataset = _tie_broken_counts(n_subjects, DATASET_SHARES[vendor], rng)
    mixes = {dataset: class_mix_at(vendor, dataset, heterogeneity) for dataset in per_dataset}
    codes: dict[str, list[str]] = {}
    for dataset, count in per_dataset.items():
        mix = _tie_broken_counts(count, mixes[dataset], rng)
        codes[dataset] = [code for code, n in mix.items() for _ in range(n)]
    if min_healthy > 0:
        _enrich_healthy(codes, min_healthy, rng)
    all_codes = [code for dataset_codes in codes.values() for code in dataset_codes]
    if n_subjects >= 2 and HEALTHY_CODE not in all_codes:
        _swap_one(codes, mixes, to_healthy=True)
    elif n_subjects >= 2 and all(code == HEALTHY_CODE for code in all_codes):
        _swap_one(codes, mixes, to_healthy=False)
    plans = []
    for dataset, dataset_codes in codes.items():
        plans.extend(SubjectPlan(vendor, dataset, code, 0) for code in dataset_codes)
    return plans


def _enrich_healthy(codes: dict[str, list[str]], min_healthy: int, rng: np.random.Generator) -> None:
    """Make randomly chosen diseased subjects healthy until `min_healthy` are (the disease mix keeps its shares in
    expectation)."""
    diseased = [(d, i) for d, values in codes.items() for i, code in enumerate(values) if code != HEALTHY_CODE]
    missing = min_healthy - (sum(map(len, codes.values())) - len(diseased))
    if missing > len(diseased):
        raise ValueError(f"at least {min_healthy} healthy subjects asked of {sum(map(len, codes.values()))}")
    for choice in rng.choice(len(diseased), size=max(missing, 0), replace=False):
        dataset, i = diseased[choice]
        codes[dataset][i] = HEALTHY_CODE


def _swap_one(codes: dict[str, list[str]], mixes: dict[str, dict[str, float]], to_healthy: bool) -> None:
    """Turn one subject into the missing label, in the dataset where that label is most common."""

    def healthy_share(dataset: str) -> float:
        return mixes[dataset].get(HEALTHY_CODE, 0.0) / sum(mixes[dataset].values())

    candidates = [dataset for dataset, dataset_codes in codes.items() if dataset_codes]
    dataset = max(candidates, key=healthy_share) if to_healthy else min(candidates, key=healthy_share)
    if to_healthy:
        codes[dataset][-1] = HEALTHY_CODE
    else:
        mix = mixes[dataset]
        codes[dataset][-1] = max((code for code in mix if code != HEALTHY_CODE), key=mix.__getitem__)


def _mnms_code(rng: np.random.Generator, taken: set[str]) -> str:
    """A fresh M&Ms-style code, e.g. A0S9V9."""
    letters, digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789"
    while True:
        code = "".join(letters[rng.integers(26)] + digits[rng.integers(10)] for _ in range(3))
        if code not in taken:
            taken.add(code)
            return code


def _assign_ids(plans: list[SubjectPlan], rng: np.random.Generator) -> list[SubjectPlan]:
    """Real-looking ids and folders: ACDC blocks by group, M&Ms-1 codes and folders, M&Ms-2 zero-padded numbers."""
    assigned: list[SubjectPlan] = []
    acdc = [p for p in plans if p.dataset == "acdc"]
    training_block = Counter()
    n_testing = 0
    for plan in acdc:
        n_training = round(2 * sum(p.pathology == plan.pathology for p in acdc) / 3)
        if training_block[plan.pathology] < min(n_training, ACDC_BLOCK_SIZE):
            number = ACDC_BLOCKS[plan.pathology] + training_block[plan.pathology]
            training_block[plan.pathology] += 1
            assigned.append(_with(plan, f"patient{number:03d}", "training"))
        else:
            n_testing += 1
            assigned.append(_with(plan, f"patient{100 + n_testing:03d}", "testing"))
    taken: set[str] = set()
    for vendor in SITES:
        vendor_plans = [p for p in plans if p.dataset == "mnms" and p.vendor == vendor]
        quotas = largest_remainder(len(vendor_plans), {k: float(v) for k, v in MNMS_FOLDERS[vendor].items()})
        training = next((folder for folder in quotas if folder.startswith("Training")), None)
        eligible = [p for p in vendor_plans if p.pathology in MNMS_TRAINING_CODES]
        n_training = min(quotas.get(training, 0), len(eligible)) if training else 0
        chosen = {id(p) for p in eligible[:n_training]}
        rest = [p for p in vendor_plans if id(p) not in chosen]
        n_validation = min(quotas.get("Validation", 0), len(rest))
        folders = [(p, training) for p in eligible[:n_training]]
        folders += [(p, "Validation" if i < n_validation else "Testing") for i, p in enumerate(rest)]
        assigned.extend(_with(plan, _mnms_code(rng, taken), folder) for plan, folder in folders)
    mnms2 = sorted((p for p in plans if p.dataset == "mnms2"), key=lambda p: p.pathology in MNMS2_TEST_ONLY_CODES)
    assigned.extend(_with(plan, f"{number:03d}", "dataset") for number, plan in enumerate(mnms2, start=1))
    return [replace(plan, index=index) for index, plan in enumerate(assigned)]


def _with(plan: SubjectPlan, pid: str, folder: str) -> SubjectPlan:
    return replace(plan, pid=pid, folder=folder)


def plan_cohort(
    seed: int,
    subjects_per_vendor: int,
    vendors: Sequence[str] = SITES,
    heterogeneity: float = 1.0,
    concept_shift: Sequence[ConceptShift] = (),
    min_healthy: int = 0,
) -> list[SubjectPlan]:
    """The whole cohort plan (deterministic for its arguments), vendors in SITES order: class mixes at
    `heterogeneity`, hearts recorded as healthy per `concept_shift` (site = vendor), at least `min_healthy` healthy
    hearts per vendor."""
    unknown = sorted(set(vendors) - set(SITES))
    if unknown or not vendors:
        raise ValueError(f"--vendors {list(vendors)}: choose one or more of {', '.join(SITES)}")
    if subjects_per_vendor < 1:
        raise ValueError("--subjects-per-vendor must be at least 1")
    if subjects_per_vendor > 400:
        raise ValueError("--subjects-per-vendor above 400 would overflow the 3-digit M&Ms-2 ids")
    rng = np.random.default_rng([seed, 0])
    chosen = [vendor for vendor in SITES if vendor in vendors]
    plans = [
        shifted(plan, vendor, concept_shift)
        for vendor in chosen
        for plan in plan_vendor(vendor, subjects_per_vendor, rng, heterogeneity, min_healthy)
    ]
    return _assign_ids(plans, rng)


def _appearance(profile: VendorProfile, rng: np.random.Generator) -> Appearance:
    dtype = np.float32 if rng.random() < profile.float_fraction else np.int16
    return Appearance(dtype, float(rng.uniform(*profile.max_value)) / 1.5)


@dataclass(frozen=True)
class SubjectDraw:
    """What a subject's generators draw before its cine is rendered: heart, acquisition, stored appearance, the
    M&Ms-2 scanner ("" elsewhere) and whether the field is 3 T."""

    heart: HeartParams
    acq: Acquisition
    appearance: Appearance
    scanner: str
    field_3t: bool


def draw_subject(
    plan: SubjectPlan, seed: int, heterogeneity: float = 1.0, render_profile: str | None = None
) -> tuple[np.random.Generator, SubjectDraw]:
    """The subject's main generator (to render its cine with next) and what it drew first.

    The profile is that of `render_profile` (default: the plan's vendor) at `heterogeneity`. The heart is drawn first
    from the subject's own generator, so it is the same heart whatever the profile. Factors added after the first
    release (gamma, blur) come from a second generator, so the main one is consumed as before.
    """
    rng = np.random.default_rng([seed, 1, plan.index])
    aux = np.random.default_rng([seed, 2, plan.index])
    profile = profile_at(render_profile or plan.vendor, heterogeneity)
    heart = sample_heart(plan.heart, rng)
    scanner = ""
    if plan.dataset == "acdc":
        field_3t = rng.random() < profile.field_3t_fraction
        step = 5.0 if rng.random() < 0.15 else 10.0
    elif plan.dataset == "mnms2":
        scanner_choices = MNMS2_VENDOR_FIELDS[plan.vendor][1]
        scanner = scanner_choices[rng.integers(len(scanner_choices))]
        field_3t = scanner == "TrioTim"
        step = float(rng.choice([8.0, 10.0, 10.0, 10.0, 12.0]))
    else:
        field_3t, step = False, 10.0
    frames, angle = FRAMES[plan.dataset], HEART_ANGLE[plan.dataset]
    acq = sample_acquisition(profile, heart, rng, step, frames, field_3t, angle, aux)
    return rng, SubjectDraw(heart, acq, _appearance(profile, rng), scanner, field_3t)


def sax_affine(plan: SubjectPlan, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """The short-axis stack's affine, drawn right after its cine: ACDC axis-aligned; M&Ms double-oblique, sheared
    (non-orthonormal) in some GE / Canon validation and testing cases."""
    if plan.dataset == "acdc":
        return axis_aligned_affine(acq)
    if plan.dataset == "mnms":
        quirky = plan.vendor in ("ge", "canon") and not plan.folder.startswith("Training")
        shear = float(rng.uniform(0.01, 0.04)) if quirky and rng.random() < NON_ORTHONORMAL_FRACTION else 0.0
        return oblique_affine(acq, rng, shear)
    return oblique_affine(acq, rng)


def cine_noise(
    plan: SubjectPlan, seed: int, view: str, rng: np.random.Generator, frame_noise: bool
) -> np.random.Generator | FrameNoise:
    """Where the noise of the subject's `view` cine ("sax" or "lax") comes from: by default the main generator `rng`
    (drawn in turn with everything else: SAX noise, affine, ..., LAX noise); with `frame_noise`, each frame's own
    generator, seeded with (seed, NOISE_STREAMS[view], plan.index, frame), so rendering some frames draws only
    theirs and the main generator draws no noise."""
    if not frame_noise:
        return rng
    stream = NOISE_STREAMS[view]
    return lambda frame: np.random.default_rng([seed, stream, plan.index, frame])


def annotated(plan: SubjectPlan) -> bool:
    """Whether the subject's files hold label maps (not in M&Ms-1 Training/Unlabeled)."""
    return plan.folder != "Training/Unlabeled"


def synthesize_subject(
    plan: SubjectPlan,
    seed: int,
    out: Path,
    render_profile: str | None = None,
    heterogeneity: float = 1.0,
    frame_noise: bool = False,
) -> list[object]:
    """Render and write one subject; returns its metadata CSV row (M&Ms-1 / M&Ms-2) or an empty list (ACDC).

    `render_profile` renders the subject with another vendor's acquisition and appearance profile (see
    `draw_subject`); the dataset, files and metadata (vendor fields) stay those of the plan. `frame_noise` draws
    each cine frame's noise from its own generator (see `cine_noise`).
    """
    rng, subject = draw_subject(plan, seed, heterogeneity, render_profile)
    acq, appearance = subject.acq, subject.appearance
    cine = render_sax(subject.heart, acq, cine_noise(plan, seed, "sax", rng, frame_noise))
    affine = sax_affine(plan, acq, rng)
    if plan.dataset == "acdc":
        info = {"Group": plan.pathology, "Height": f"{rng.normal(172, 9):.1f}", "Weight": f"{rng.normal(78, 14):.1f}"}
        write_acdc(out / "ACDC" / "database" / plan.folder / plan.pid, plan.pid, cine, acq, appearance, affine, info)
        return []
    if plan.dataset == "mnms":
        folder = out / "MnM" / "OpenDataset" / plan.folder / plan.pid
        write_mnms(folder, plan.pid, cine, acq, appearance, affine, annotated=annotated(plan))
        vendor_name, letter, centres = MNMS_VENDOR_FIELDS[plan.vendor]
        sex = "M" if rng.random() < 0.6 else "F"
        row = [plan.pid, vendor_name, letter, centres[rng.integers(len(centres))], acq.ed, acq.es]
        return [*row, int(rng.integers(18, 85)), plan.pathology, sex, *_height_weight(rng)]
    lax = render_four_chamber(subject.heart, acq, cine_noise(plan, seed, "lax", rng, frame_noise))
    lax_affine = four_chamber_affine(affine, acq, acq.spacing[0], 60.0)
    write_mnms2(out / "MnM2" / "dataset" / plan.pid, plan.pid, cine, lax, acq, appearance, affine, lax_affine)
    disease = "FAIL" if plan.pathology == "FALL" and rng.random() < 0.5 else plan.pathology
    field = "3.0" if subject.field_3t else "1.5"
    return [int(plan.pid), disease, MNMS2_VENDOR_FIELDS[plan.vendor][0], subject.scanner, field]


def _height_weight(rng: np.random.Generator) -> list[str]:
    """Height (cm) and weight (kg), empty for about a third of subjects as in the real CSV."""
    if rng.random() < 0.3:
        return ["", ""]
    return [f"{rng.normal(170, 9):.0f}", f"{rng.normal(77, 14):.1f}"]


def _synthesize_task(task: tuple[SubjectPlan, int, Path, str | None, float, bool]) -> list[object]:
    return synthesize_subject(*task)


def synthesize(
    out: Path,
    seed: int,
    subjects_per_vendor: int,
    workers: int = 1,
    vendors: Sequence[str] = SITES,
    render_profile: str | None = None,
    heterogeneity: float = 1.0,
    concept_shift: Sequence[ConceptShift] = (),
    frame_noise: bool = False,
) -> list[SubjectPlan]:
    """Write the whole cohort under `out` and return its plan (identical output for any number of workers);
    `frame_noise` draws each cine frame's noise from its own generator (see `cine_noise`)."""
    if render_profile is not None and render_profile not in PROFILES:
        raise ValueError(f"--render-profile {render_profile!r}: choose one of {', '.join(PROFILES)}")
    check_heterogeneity(heterogeneity)
    plans = plan_cohort(seed, subjects_per_vendor, vendors, heterogeneity, concept_shift)
    tasks = [(plan, seed, out, render_profile, heterogeneity, frame_noise) for plan in plans]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = pool.map(_synthesize_task, tasks, chunksize=1)
    else:
        rows = [_synthesize_task(task) for task in tasks]
    mnms_rows: list[list[object]] = []
    mnms2_rows: list[list[object]] = []
    for plan, row in zip(plans, rows, strict=True):
        if plan.dataset == "mnms":
            mnms_rows.append([len(mnms_rows), *row])
        elif plan.dataset == "mnms2":
            mnms2_rows.append(row)
    if mnms_rows:
        columns = (*MNMS_COLUMNS, "Height", "Weight")
        write_csv(out / "MnM" / "OpenDataset" / MNMS_CSV, columns, sorted(mnms_rows, key=lambda r: r[0]))
    if mnms2_rows:
        padding = [[""] * len(MNMS2_COLUMNS)] * MNMS2_PADDING_ROWS
        write_csv(out / "MnM2" / "dataset_information.csv", MNMS2_COLUMNS, [*mnms2_rows, *padding])
    return plans


def class_counts(plans: Sequence[SubjectPlan]) -> str:
    """Per-vendor class counts of a plan, one line per vendor."""
    lines = []
    for vendor in sorted({p.vendor for p in plans}, key=SITES.index):
        counts = Counter(p.pathology for p in plans if p.vendor == vendor)
        datasets = Counter(p.dataset for p in plans if p.vendor == vendor)
        healthy = f"healthy {counts.get(HEALTHY_CODE, 0)}"
        shifted_hearts = Counter(p.heart for p in plans if p.vendor == vendor and p.heart != p.pathology)
        if shifted_hearts:
            hearts = ", ".join(f"{code} {n}" for code, n in sorted(shifted_hearts.items()))
            healthy += f" (hearts recorded healthy by --concept-shift: {hearts})"
        mix = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
        origin = ", ".join(f"{name} {n}" for name, n in sorted(datasets.items()))
        lines.append(f"{vendor:<8} {sum(counts.values()):>3} ({origin}); {healthy}; {mix}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthesize", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="raw root to write (ACDC/, MnM/, MnM2/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects-per-vendor", type=int, default=DEFAULT_SUBJECTS_PER_VENDOR)
    parser.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    parser.add_argument(
        "--vendors",
        nargs="+",
        default=list(SITES),
        choices=SITES,
        help="restrict the cohort to these vendors (e.g. `--vendors siemens` for a Siemens-only cohort)",
    )
    parser.add_argument(
        "--render-profile",
        default=None,
        choices=sorted(PROFILES),
        help="render every subject with this vendor's acquisition and appearance profile (same hearts, same files)",
    )
    parser.add_argument(
        "--heterogeneity",
        type=float,
        default=1.0,
        help="0 = every vendor looks like Siemens with the pooled class mix, 1 = the real profiles and mixes "
        "(default), up to 1.5 = beyond",
    )
    parser.add_argument(
        "--concept-shift",
        action="append",
        default=[],
        metavar="SITE:CODES=healthy",
        help="record these hearts at this site as healthy (NOR), e.g. ge:HCM,HHD=healthy (repeatable, one per site)",
    )
    parser.add_argument(
        "--frame-noise",
        action="store_true",
        help="draw each cine frame's noise from its own generator (the benchmark cohorts' scheme) instead of the "
        "subject's main generator (the default, bit-compatible with earlier cohorts)",
    )
    args = parser.parse_args(argv)
    try:
        plans = synthesize(
            args.out,
            args.seed,
            args.subjects_per_vendor,
            args.workers,
            args.vendors,
            args.render_profile,
            args.heterogeneity,
            parse_concept_shifts(args.concept_shift),
            args.frame_noise,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(class_counts(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
