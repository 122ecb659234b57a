"""`python -m data_prep.synthesize`: a deterministic multi-vendor synthetic cohort in the real ACDC / M&Ms layouts.

`--subjects-per-vendor N` subjects per vendor, split over datasets as the real open data (siemens = ACDC + M&Ms-1 A +
M&Ms-2 SIEMENS, philips = M&Ms-1 B + M&Ms-2 Philips, ge = M&Ms-1 C + M&Ms-2 GE, canon = M&Ms-1 D), with per-vendor
class mixes from the real counts (data_prep/vendors.py, docs/synthetic-cohort.md). Output:
RAW/ACDC/database/{training,testing}/patientNNN/..., RAW/MnM/OpenDataset/..., RAW/MnM2/....
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.anatomy import sample_heart
from data_prep.layouts import (
    Appearance,
    four_chamber_affine,
    oblique_affine,
    write_acdc,
    write_csv,
    write_mnms,
    write_mnms2,
)
from data_prep.phantom import render_four_chamber, render_sax, sample_acquisition
from data_prep.vendors import (
    CLASS_MIX,
    DATASET_SHARES,
    MNMS2_TEST_ONLY_CODES,
    MNMS2_VENDOR_FIELDS,
    MNMS_FOLDERS,
    MNMS_TRAINING_CODES,
    MNMS_VENDOR_FIELDS,
    PROFILES,
    VendorProfile,
    largest_remainder,
)
from models.protocol import SITES

DEFAULT_SUBJECTS_PER_VENDOR = 20
MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS_COLUMNS = ("", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex")
MNMS2_COLUMNS = ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD")
ACDC_BLOCKS = {"DCM": 1, "HCM": 21, "MINF": 41, "NOR": 61, "RV": 81}
FRAMES = {"acdc": (12, 20), "mnms": (18, 20), "mnms2": (18, 20)}
HEART_ANGLE = {"acdc": np.pi / 2, "mnms": np.pi / 3, "mnms2": 2 * np.pi / 3}
NON_ORTHONORMAL_FRACTION = 0.3
MNMS2_PADDING_ROWS = 8


@dataclass(frozen=True)
class SubjectPlan:
    """One synthetic subject: where it goes and what it has; `index` seeds its own generator."""

    vendor: str
    dataset: str
    pathology: str
    index: int
    pid: str = ""
    folder: str = ""


def _tie_broken_counts(total: int, weights: dict[str, float], rng: np.random.Generator) -> dict[str, int]:
    """Largest-remainder counts with ties broken by the seeded generator (not by key order)."""
    keys = list(weights)
    order = [keys[i] for i in rng.permutation(len(keys))]
    counts = largest_remainder(total, {key: weights[key] for key in order})
    return {key: counts[key] for key in keys}


def plan_vendor(vendor: str, n_subjects: int, rng: np.random.Generator) -> list[SubjectPlan]:
    """Dataset and pathology of each subject of one vendor; both labels present whenever n_subjects >= 2."""
    per_dataset = _tie_broken_counts(n_subjects, DATASET_SHARES[vendor], rng)
    codes: dict[str, list[str]] = {}
    for dataset, count in per_dataset.items():
        mix = _tie_broken_counts(count, CLASS_MIX[vendor, dataset], rng)
        codes[dataset] = [code for code, n in mix.items() for _ in range(n)]
    all_codes = [code for dataset_codes in codes.values() for code in dataset_codes]
    if n_subjects >= 2 and "NOR" not in all_codes:
        _swap_one(codes, vendor, to_healthy=True)
    elif n_subjects >= 2 and all(code == "NOR" for code in all_codes):
        _swap_one(codes, vendor, to_healthy=False)
    plans = []
    for dataset, dataset_codes in codes.items():
        plans.extend(SubjectPlan(vendor, dataset, code, 0) for code in dataset_codes)
    return plans


def _swap_one(codes: dict[str, list[str]], vendor: str, to_healthy: bool) -> None:
    """Turn one subject into the missing label, in the dataset where that label is most common."""

    def healthy_share(dataset: str) -> float:
        mix = CLASS_MIX[vendor, dataset]
        return mix["NOR"] / sum(mix.values())

    candidates = [dataset for dataset, dataset_codes in codes.items() if dataset_codes]
    dataset = max(candidates, key=healthy_share) if to_healthy else min(candidates, key=healthy_share)
    if to_healthy:
        codes[dataset][-1] = "NOR"
    else:
        mix = CLASS_MIX[vendor, dataset]
        codes[dataset][-1] = max((code for code in mix if code != "NOR"), key=mix.__getitem__)


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
        if training_block[plan.pathology] < round(2 * sum(p.pathology == plan.pathology for p in acdc) / 3):
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
    return [SubjectPlan(p.vendor, p.dataset, p.pathology, index, p.pid, p.folder) for index, p in enumerate(assigned)]


def _with(plan: SubjectPlan, pid: str, folder: str) -> SubjectPlan:
    return SubjectPlan(plan.vendor, plan.dataset, plan.pathology, plan.index, pid, folder)


def plan_cohort(seed: int, subjects_per_vendor: int, vendors: Sequence[str] = SITES) -> list[SubjectPlan]:
    """The whole cohort plan (deterministic for a seed and a vendor list), vendors in SITES order."""
    unknown = sorted(set(vendors) - set(SITES))
    if unknown or not vendors:
        raise ValueError(f"--vendors {list(vendors)}: choose one or more of {', '.join(SITES)}")
    if subjects_per_vendor < 1:
        raise ValueError("--subjects-per-vendor must be at least 1")
    if subjects_per_vendor > 400:
        raise ValueError("--subjects-per-vendor above 400 would overflow the 3-digit M&Ms-2 ids")
    rng = np.random.default_rng([seed, 0])
    chosen = [vendor for vendor in SITES if vendor in vendors]
    plans = [plan for vendor in chosen for plan in plan_vendor(vendor, subjects_per_vendor, rng)]
    return _assign_ids(plans, rng)


def _appearance(profile: VendorProfile, rng: np.random.Generator) -> Appearance:
    dtype = np.float32 if rng.random() < profile.float_fraction else np.int16
    return Appearance(dtype, float(rng.uniform(*profile.max_value)) / 1.5)


def synthesize_subject(plan: SubjectPlan, seed: int, out: Path, render_profile: str | None = None) -> list[object]:
    """Render and write one subject; returns its metadata CSV row (M&Ms-1 / M&Ms-2) or an empty list (ACDC).

    `render_profile` renders the subject with another vendor's acquisition and appearance profile. The heart is
    drawn first from the subject's own generator, so it is the same heart whatever the profile; the dataset,
    files and metadata (vendor fields) stay those of the plan.
    """
    rng = np.random.default_rng([seed, 1, plan.index])
    profile = PROFILES[render_profile or plan.vendor]
    heart = sample_heart(plan.pathology, rng)
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
    acq = sample_acquisition(profile, heart, rng, step, FRAMES[plan.dataset], field_3t, HEART_ANGLE[plan.dataset])
    appearance = _appearance(profile, rng)
    cine = render_sax(heart, acq, rng)
    if plan.dataset == "acdc":
        info = {"Group": plan.pathology, "Height": f"{rng.normal(172, 9):.1f}", "Weight": f"{rng.normal(78, 14):.1f}"}
        write_acdc(out / "ACDC" / "database" / plan.folder / plan.pid, plan.pid, cine, acq, appearance, info)
        return []
    if plan.dataset == "mnms":
        quirky = plan.vendor in ("ge", "canon") and not plan.folder.startswith("Training")
        shear = float(rng.uniform(0.01, 0.04)) if quirky and rng.random() < NON_ORTHONORMAL_FRACTION else 0.0
        affine = oblique_affine(acq, rng, shear)
        folder = out / "MnM" / "OpenDataset" / plan.folder / plan.pid
        write_mnms(folder, plan.pid, cine, acq, appearance, affine, annotated=plan.folder != "Training/Unlabeled")
        vendor_name, letter, centres = MNMS_VENDOR_FIELDS[plan.vendor]
        sex = "M" if rng.random() < 0.6 else "F"
        row = [plan.pid, vendor_name, letter, centres[rng.integers(len(centres))], acq.ed, acq.es]
        return [*row, int(rng.integers(18, 85)), plan.pathology, sex, *_height_weight(rng)]
    sax_affine = oblique_affine(acq, rng)
    lax = render_four_chamber(heart, acq, rng)
    lax_affine = four_chamber_affine(sax_affine, acq, acq.spacing[0], 60.0)
    write_mnms2(out / "MnM2" / "dataset" / plan.pid, plan.pid, cine, lax, acq, appearance, sax_affine, lax_affine)
    disease = "FAIL" if plan.pathology == "FALL" and rng.random() < 0.5 else plan.pathology
    return [int(plan.pid), disease, MNMS2_VENDOR_FIELDS[plan.vendor][0], scanner, "3.0" if field_3t else "1.5"]


def _height_weight(rng: np.random.Generator) -> list[str]:
    """Height (cm) and weight (kg), empty for about a third of subjects as in the real CSV."""
    if rng.random() < 0.3:
        return ["", ""]
    return [f"{rng.normal(170, 9):.0f}", f"{rng.normal(77, 14):.1f}"]


def _synthesize_task(task: tuple[SubjectPlan, int, Path, str | None]) -> list[object]:
    return synthesize_subject(*task)


def synthesize(
    out: Path,
    seed: int,
    subjects_per_vendor: int,
    workers: int = 1,
    vendors: Sequence[str] = SITES,
    render_profile: str | None = None,
) -> list[SubjectPlan]:
    """Write the whole cohort under `out` and return its plan (identical output for any number of workers)."""
    if render_profile is not None and render_profile not in PROFILES:
        raise ValueError(f"--render-profile {render_profile!r}: choose one of {', '.join(PROFILES)}")
    plans = plan_cohort(seed, subjects_per_vendor, vendors)
    tasks = [(plan, seed, out, render_profile) for plan in plans]
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
        healthy = counts.get("NOR", 0)
        mix = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
        origin = ", ".join(f"{name} {n}" for name, n in sorted(datasets.items()))
        lines.append(f"{vendor:<8} {sum(counts.values()):>3} ({origin}); healthy {healthy}; {mix}")
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
    args = parser.parse_args(argv)
    try:
        plans = synthesize(
            args.out, args.seed, args.subjects_per_vendor, args.workers, args.vendors, args.render_profile
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(class_counts(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
