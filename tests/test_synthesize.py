"""Synthetic cohort: layouts and quirks, determinism, per-vendor class mix, pathology-driven anatomy, appearance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.anatomy import sample_heart
from data_prep.layouts import oblique_affine
from data_prep.phantom import contraction_phase, render_sax, sample_acquisition
from data_prep.records import LV_LABEL
from data_prep.synthesize import main as synthesize_main
from data_prep.synthesize import plan_cohort, synthesize, synthesize_subject
from data_prep.vendors import PROFILES


def test_raw_layouts_have_the_real_file_names(synthetic_raw: Path) -> None:
    patient = next((synthetic_raw / "ACDC" / "database" / "training").iterdir())
    ed = int(next(line for line in (patient / "Info.cfg").read_text().splitlines() if line.startswith("ED:"))[4:])
    names = {p.name for p in patient.iterdir()}
    assert {"Info.cfg", "MANDATORY_CITATION.md", f"{patient.name}_4d.nii.gz"} <= names
    assert {f"{patient.name}_frame{ed:02d}.nii.gz", f"{patient.name}_frame{ed:02d}_gt.nii.gz"} <= names
    assert (
        synthetic_raw / "MnM" / "OpenDataset" / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
    ).is_file()
    code = next((synthetic_raw / "MnM" / "OpenDataset" / "Testing").iterdir()).name
    assert {p.name for p in (synthetic_raw / "MnM" / "OpenDataset" / "Testing" / code).iterdir()} == {
        f"{code}_sa.nii.gz",
        f"{code}_sa_gt.nii.gz",
    }
    subject = synthetic_raw / "MnM2" / "dataset" / "001"
    expected = {f"001_{v}_{p}{g}.nii.gz" for v in ("SA", "LA") for p in ("ED", "ES") for g in ("", "_gt")}
    assert {p.name for p in subject.iterdir()} == expected | {"001_SA_CINE.nii.gz", "001_LA_CINE.nii.gz"}
    assert nib.load(subject / "001_LA_CINE.nii.gz").shape[2] == 1


def test_info_cfg_is_alphabetical_key_value(synthetic_raw: Path) -> None:
    patient = next((synthetic_raw / "ACDC" / "database" / "training").iterdir())
    keys = [line.split(": ")[0] for line in (patient / "Info.cfg").read_text().splitlines()]
    assert keys == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]


def test_mnms_csv_has_unnamed_index_column(synthetic_raw: Path) -> None:
    csv_path = next((synthetic_raw / "MnM" / "OpenDataset").glob("*.csv"))
    header, first = csv_path.read_text().splitlines()[:2]
    assert header.startswith(",External code,VendorName,Vendor,Centre,ED,ES,")
    assert first.split(",")[0] == "0"


def test_affines_and_dtypes_per_layout(synthetic_raw: Path) -> None:
    acdc = nib.load(next((synthetic_raw / "ACDC").rglob("*_4d.nii.gz")))
    assert np.count_nonzero(acdc.affine[:3, :3] - np.diag(np.diag(acdc.affine[:3, :3]))) == 0
    mnms = nib.load(next((synthetic_raw / "MnM").rglob("*_sa.nii.gz")))
    assert np.count_nonzero(np.abs(mnms.affine[:3, :3]) > 1e-3) > 3 and mnms.ndim == 4
    dtypes = {nib.load(p).get_data_dtype() for p in (synthetic_raw / "MnM").rglob("*_sa.nii.gz")}
    assert dtypes <= {np.dtype(np.int16), np.dtype(np.float32)}


def test_non_orthonormal_affine_quirk() -> None:
    rng = np.random.default_rng(0)
    heart = sample_heart("NOR", rng)
    acq = sample_acquisition(PROFILES["ge"], heart, rng, 10.0, (18, 18), False, 0.0, rng)
    directions = oblique_affine(acq, rng, shear=0.03)[:3, :3] / [*acq.spacing, acq.slice_step]
    assert abs(np.dot(directions[:, 0], directions[:, 1])) > 0.02


def test_plan_is_deterministic_and_sized() -> None:
    assert plan_cohort(5, 20) == plan_cohort(5, 20)
    assert plan_cohort(5, 20) != plan_cohort(6, 20)
    counts = Counter(p.vendor for p in plan_cohort(5, 20))
    assert counts == dict.fromkeys(["siemens", "philips", "ge", "canon"], 20)


def test_subject_rendering_is_deterministic(tmp_path: Path) -> None:
    plan = next(p for p in plan_cohort(1, 2) if p.dataset == "mnms")
    rows = [synthesize_subject(plan, 1, tmp_path / name) for name in ("a", "b")]
    assert rows[0] == rows[1]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    for relative in files:
        first, second = nib.load(tmp_path / "a" / relative), nib.load(tmp_path / "b" / relative)
        assert np.array_equal(np.asanyarray(first.dataobj), np.asanyarray(second.dataobj))
        assert np.array_equal(first.affine, second.affine)


def test_vendor_restriction_keeps_the_vendor_and_its_datasets() -> None:
    plans = plan_cohort(5, 30, vendors=["siemens"])
    assert {p.vendor for p in plans} == {"siemens"} and len(plans) == 30
    assert {p.dataset for p in plans} == {"acdc", "mnms", "mnms2"}
    # Siemens comes first in the full cohort, so restricting to it keeps exactly its subjects.
    assert [(p.dataset, p.pathology) for p in plans] == [
        (p.dataset, p.pathology) for p in plan_cohort(5, 30) if p.vendor == "siemens"
    ]
    with pytest.raises(ValueError, match="--vendors"):
        plan_cohort(5, 30, vendors=["toshiba"])


def test_render_profile_draws_the_same_heart_with_another_appearance(tmp_path: Path) -> None:
    """Same plan, same heart (label-map phenotypes agree), other scanner (spacing, contrast and noise differ)."""
    from data_prep.phenotypes import subject_phenotypes
    from data_prep.readers import discover
    from data_prep.records import LabelRule

    plan = next(p for p in plan_cohort(3, 4, vendors=["siemens"]) if p.dataset == "acdc")
    synthesize_subject(plan, 3, tmp_path / "own")
    synthesize_subject(plan, 3, tmp_path / "ge", render_profile="ge")
    own, other = (discover([tmp_path / name], LabelRule()).records[0] for name in ("own", "ge"))
    assert own.subject_id == other.subject_id and own.pathology == other.pathology
    a, b = subject_phenotypes(own), subject_phenotypes(other)
    for name in ("lv_edv_ml", "rv_edv_ml", "myo_ed_ml"):
        assert b[name] == pytest.approx(a[name], rel=0.15), name
    spacing = [nib.load(record.ed_image.path).header.get_zooms()[0] for record in (own, other)]
    assert PROFILES["siemens"].spacing_mm[0] <= spacing[0] <= PROFILES["siemens"].spacing_mm[1]
    assert PROFILES["ge"].spacing_mm[0] <= spacing[1] <= PROFILES["ge"].spacing_mm[1]
    with pytest.raises(ValueError, match="--render-profile"):
        synthesize(tmp_path / "x", seed=0, subjects_per_vendor=1, render_profile="nope")


def test_per_vendor_class_mix_follows_real_counts() -> None:
    plans = plan_cohort(0, 200)
    healthy = {v: sum(p.pathology == "NOR" for p in plans if p.vendor == v) / 200 for v in PROFILES}
    assert 0.15 <= healthy["siemens"] <= 0.25 and 0.35 <= healthy["philips"] <= 0.45
    assert 0.2 <= healthy["ge"] <= 0.35 and 0.25 <= healthy["canon"] <= 0.32
    assert {p.dataset for p in plans if p.vendor == "canon"} == {"mnms"}
    assert {p.dataset for p in plans if p.vendor == "siemens"} == {"acdc", "mnms", "mnms2"}
    mnms2_codes = {p.pathology for p in plans if p.dataset == "mnms2"}
    assert {"LV", "ARR", "FALL", "CIA", "TRI", "RV"} <= mnms2_codes


def test_both_labels_present_per_vendor_in_tiny_cohorts() -> None:
    for seed in range(5):
        plans = plan_cohort(seed, 2)
        for vendor in PROFILES:
            labels = {p.pathology == "NOR" for p in plans if p.vendor == vendor}
            assert labels == {True, False}


def test_pathology_shapes_anatomy() -> None:
    rng = np.random.default_rng(0)
    hearts = {code: [sample_heart(code, rng) for _ in range(300)] for code in ("NOR", "DCM", "HCM", "MINF", "RV")}

    def mean(code: str, name: str) -> float:
        return float(np.mean([getattr(h, name) for h in hearts[code]]))

    assert (
        mean("DCM", "lv_radius") > mean("NOR", "lv_radius") + 4 and mean("DCM", "lv_ef") < mean("NOR", "lv_ef") - 0.15
    )
    assert mean("HCM", "wall") > mean("NOR", "wall") + 3
    assert mean("MINF", "akinetic_halfwidth") > 0.4 and mean("RV", "rv_scale") > mean("NOR", "rv_scale") + 0.2


def _best_threshold_balanced_accuracy(healthy: np.ndarray, diseased: np.ndarray) -> float:
    best = 0.0
    for threshold in np.quantile(np.concatenate([healthy, diseased]), np.linspace(0, 1, 201)):
        for sign in (1, -1):
            specificity = np.mean(sign * (healthy - threshold) <= 0)
            best = max(best, 0.5 * (specificity + np.mean(sign * (diseased - threshold) > 0)))
    return best


def test_no_single_anatomical_feature_separates_healthy_from_diseased() -> None:
    rng = np.random.default_rng(0)
    codes = ["DCM", "HCM", "MINF", "RV", "HHD", "ARV", "AHS", "IHD", "LV", "Other", "ARR", "FALL", "CIA", "TRI"]
    healthy = [sample_heart("NOR", rng) for _ in range(300)]
    diseased = [sample_heart(codes[i % len(codes)], rng) for i in range(840)]
    for name in ("lv_radius", "lv_length", "wall", "lv_ef", "rv_scale", "rv_ef"):
        values = [np.array([getattr(h, name) for h in group]) for group in (healthy, diseased)]
        assert _best_threshold_balanced_accuracy(*values) < 0.8, name


def test_rendered_heart_beats_and_ef_depends_on_pathology() -> None:
    def ejection_fraction(code: str, seed: int) -> float:
        rng = np.random.default_rng(seed)
        heart = sample_heart(code, rng)
        acq = sample_acquisition(PROFILES["canon"], heart, rng, 10.0, (18, 18), False, 0.0, rng)
        cine = render_sax(heart, acq, rng)
        edv, esv = ((cine.labels[t] == LV_LABEL).sum() for t in (acq.ed, acq.es))
        return 1 - esv / edv

    healthy = [ejection_fraction("NOR", s) for s in range(3)]
    dilated = [ejection_fraction("DCM", s) for s in range(3)]
    assert all(0.4 < ef < 0.85 for ef in healthy) and np.mean(dilated) < np.mean(healthy) - 0.1


def test_contraction_phase_cycle() -> None:
    phase = contraction_phase(20, 3, 10)
    assert phase[3] == 0 and phase[10] == 1 and phase.min() == 0 and np.all(phase <= 1)


def test_vendor_noise_differs() -> None:
    """Canon's lower SNR shows in the background noise (GE's and Philips' reconstruction blur smooths theirs)."""

    def noise_to_signal(vendor: str) -> float:
        rng = np.random.default_rng(1)
        heart = sample_heart("NOR", rng)
        profile = PROFILES[vendor]
        acq = sample_acquisition(profile, heart, rng, 10.0, (18, 18), False, 0.0, rng)
        signal = render_sax(heart, acq, rng).signal
        return float(signal[:8, :8].std() / np.percentile(signal, 99))

    assert noise_to_signal("canon") > noise_to_signal("siemens")


def test_cli_rejects_zero_subjects(tmp_path: Path) -> None:
    assert synthesize_main(["--out", str(tmp_path), "--subjects-per-vendor", "0"]) == 2


@pytest.mark.parametrize("vendor", sorted(PROFILES))
def test_acquisition_follows_vendor_profile(vendor: str) -> None:
    rng = np.random.default_rng(2)
    profile = PROFILES[vendor]
    acq = sample_acquisition(profile, sample_heart("NOR", rng), rng, 10.0, (18, 20), False, 0.0, rng)
    assert profile.spacing_mm[0] <= acq.spacing[0] <= profile.spacing_mm[1]
    assert profile.snr[0] <= acq.snr <= profile.snr[1] and 5 <= acq.n_slices <= 16 and acq.ed != acq.es
