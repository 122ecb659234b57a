"""Heterogeneity knob and concept shift: profiles and class mixes at h, defaults unchanged, relabelled hearts."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.anatomy import sample_heart
from data_prep.direct import prepare_direct
from data_prep.preprocess import Geometry
from data_prep.readers import discover
from data_prep.records import KNOWN_CODES, LabelRule
from data_prep.synthesize import (
    ConceptShift,
    draw_subject,
    parse_concept_shifts,
    plan_cohort,
    synthesize,
    synthesize_subject,
)
from data_prep.synthesize import main as synthesize_main
from data_prep.vendors import (
    CLASS_MIX,
    POOLED_MIX,
    PROFILE_BOUNDS,
    PROFILES,
    REFERENCE_VENDOR,
    class_mix_at,
    profile_at,
)

GEOMETRY = Geometry((64, 64), (3.0, 3.0, 10.0), 8)
NUMERIC_FIELDS = [field.name for field in fields(PROFILES["ge"]) if field.name != "name"]


def _values(value: object) -> tuple[float, ...]:
    return tuple(value) if isinstance(value, tuple) else (float(value),)


@pytest.mark.parametrize("vendor", sorted(PROFILES))
def test_profile_at_one_is_the_vendor_and_at_zero_the_reference(vendor: str) -> None:
    assert profile_at(vendor, 1.0) == PROFILES[vendor]
    at_zero = profile_at(vendor, 0.0)
    assert at_zero.name == vendor
    assert all(getattr(at_zero, name) == getattr(PROFILES[REFERENCE_VENDOR], name) for name in NUMERIC_FIELDS)


@pytest.mark.parametrize("vendor", sorted(PROFILES))
def test_profile_between_and_beyond_stays_ordered_and_bounded(vendor: str) -> None:
    reference, own = PROFILES[REFERENCE_VENDOR], PROFILES[vendor]
    half, beyond = profile_at(vendor, 0.5), profile_at(vendor, 1.5)
    for name in NUMERIC_FIELDS:
        low, high = PROFILE_BOUNDS[name]
        assert all(low <= v <= high for v in _values(getattr(own, name))), f"{vendor}.{name} outside its bounds"
        ends = zip(_values(getattr(reference, name)), _values(getattr(own, name)), strict=True)
        for (a, b), mid in zip(ends, _values(getattr(half, name)), strict=True):
            assert min(a, b) - 0.5 <= mid <= max(a, b) + 0.5, name  # matrices round to integers
        far = _values(getattr(beyond, name))
        assert all(low <= v <= high for v in far) and list(far) == sorted(far), name
    assert all(isinstance(v, int) for v in beyond.matrix)


def test_vendor_differences_grow_beyond_one() -> None:
    assert profile_at("ge", 1.5).snr[1] < PROFILES["ge"].snr[1] < profile_at("ge", 0.5).snr[1]
    assert profile_at("ge", 1.5).blur_mm[0] > PROFILES["ge"].blur_mm[0] > profile_at("ge", 0.5).blur_mm[0] > 0
    assert profile_at("canon", 1.5).gamma[0] < PROFILES["canon"].gamma[0] < 1.0


@pytest.mark.parametrize("value", [-0.1, 1.51, float("nan")])
def test_heterogeneity_outside_the_range_is_a_clear_error(value: float, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="--heterogeneity"):
        profile_at("ge", value)
    with pytest.raises(ValueError, match="--heterogeneity"):
        plan_cohort(0, 4, heterogeneity=value)
    assert synthesize_main(["--out", str(tmp_path), "--heterogeneity", str(value)]) == 2
    assert "--heterogeneity" in capsys.readouterr().err


@pytest.mark.parametrize("key", sorted(CLASS_MIX))
def test_class_mix_is_the_real_one_at_one_and_pooled_at_zero(key: tuple[str, str]) -> None:
    vendor, dataset = key
    assert list(class_mix_at(vendor, dataset, 1.0).items()) == list(CLASS_MIX[key].items())
    for heterogeneity in (0.0, 0.5, 1.5):
        assert set(class_mix_at(vendor, dataset, heterogeneity)) <= KNOWN_CODES[dataset]

    def shares(heterogeneity: float) -> dict[str, float]:
        mix = class_mix_at(vendor, dataset, heterogeneity)
        return {code: weight / sum(mix.values()) for code, weight in mix.items()}

    assert shares(0.0) == pytest.approx(POOLED_MIX[dataset])
    assert shares(0.0)["NOR"] == pytest.approx(227 / 858)  # the healthy share of all real counts together
    real = shares(1.0)
    halfway = {code: (POOLED_MIX[dataset].get(code, 0) + real.get(code, 0)) / 2 for code in shares(0.5)}
    assert shares(0.5) == pytest.approx(halfway)


def test_pooled_cohort_has_the_same_healthy_share_at_every_site() -> None:
    for heterogeneity, spread in ((0.0, 0.03), (1.0, 0.15)):
        plans = plan_cohort(0, 200, heterogeneity=heterogeneity)
        healthy = [sum(p.pathology == "NOR" for p in plans if p.vendor == v) / 200 for v in PROFILES]
        assert (max(healthy) - min(healthy) < spread) == (heterogeneity == 0.0)
        assert all(p.pathology in KNOWN_CODES[p.dataset] for p in plans)


def test_min_healthy_enriches_with_random_diseased_subjects() -> None:
    plans = plan_cohort(4, 60, min_healthy=30)
    for vendor in PROFILES:
        codes = Counter(p.pathology for p in plans if p.vendor == vendor)
        assert codes["NOR"] == 30 and sum(codes.values()) == 60 and len(codes) > 2
    assert plan_cohort(4, 60) == plan_cohort(4, 60, min_healthy=0)


def test_acdc_ids_stay_unique_when_a_group_outgrows_its_block() -> None:
    plans = plan_cohort(0, 300, heterogeneity=0.0, min_healthy=90)
    acdc = [p for p in plans if p.dataset == "acdc"]
    assert max(Counter(p.pathology for p in acdc).values()) > 30
    assert len({p.pid for p in acdc}) == len(acdc)
    assert len({(p.dataset, p.pid) for p in plans}) == len(plans)


def _digest(path: Path) -> str:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    digest = hashlib.sha256(str((data.dtype, data.shape)).encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    digest.update(image.affine.tobytes())
    return digest.hexdigest()


# Files of the default cohort (seed 0, 20 subjects per vendor) written before the heterogeneity knob existed.
GOLDEN = {
    0: {
        "ACDC/database/training/patient061/patient061_4d.nii.gz": (
            "44ed02fe6d3edb64f082f8128e684dcaf7ddf3ce1e8e7e510d266068c5f2562d"
        ),
        "ACDC/database/training/patient061/patient061_frame01_gt.nii.gz": (
            "63be14026a7a12641dd7433aed8ded50aa6eb60bb4fc56b1f7f9ba2b114ce024"
        ),
    },
    11: {
        "MnM/OpenDataset/Testing/K3X2F7/K3X2F7_sa.nii.gz": (
            "e0d5d8fcf11cc34a8bbb04cb94052b57529a73325dc82680e509f752290ddb88"
        )
    },
    53: {
        "MnM2/dataset/001/001_SA_CINE.nii.gz": "bc5c400fe5b86ba4b0f4afbbb152b7a96ba1f165bdd233a4235ed4181527cdb8",
        "MnM2/dataset/001/001_LA_CINE.nii.gz": "d9af6817109c8a44cd3bc42fe0ac1793044ed2d213539d9ccc2a771e28b34815",
    },
    26: {
        "MnM/OpenDataset/Validation/S9Y6Z8/S9Y6Z8_sa.nii.gz": (
            "3c7ddffa401065ba6cded17db50c1d249963843a2612bf2683d1d6c683671826"
        )
    },
}


@pytest.mark.parametrize("index", sorted(GOLDEN))
def test_default_output_is_unchanged(index: int, tmp_path: Path, monkeypatch) -> None:
    """Siemens subjects are bit-identical to the files written before; so is a GE subject once its new
    reconstruction factors (blur, gamma) are set to the identity: the main generator is consumed as before."""
    plan = plan_cohort(0, 20)[index]
    if plan.vendor != "siemens":
        monkeypatch.setitem(PROFILES, plan.vendor, replace(PROFILES[plan.vendor], gamma=(1, 1), blur_mm=(0, 0)))
    synthesize_subject(plan, 0, tmp_path)
    assert {name: _digest(tmp_path / name) for name in GOLDEN[index]} == GOLDEN[index]


def test_at_zero_every_vendor_renders_like_siemens() -> None:
    plans = [p for p in plan_cohort(2, 2, heterogeneity=0.0) if p.vendor != "siemens"]
    for plan in plans[:2]:
        own = prepare_direct(plan, 2, GEOMETRY, heterogeneity=0.0)
        siemens = prepare_direct(plan, 2, GEOMETRY, heterogeneity=0.0, render_profile="siemens")
        assert np.array_equal(own.volume, siemens.volume)
        assert not np.array_equal(own.volume, prepare_direct(plan, 2, GEOMETRY, heterogeneity=1.0).volume)


def _in_plane_gradient_energy(volume: np.ndarray) -> float:
    return float(np.mean(np.diff(volume, axis=0) ** 2) + np.mean(np.diff(volume, axis=1) ** 2))


def _median(volume: np.ndarray) -> float:
    return float(np.median(volume))


FACTORS = {
    "blur smooths": ("blur_mm", PROFILES["ge"].blur_mm, _in_plane_gradient_energy, 0.8),
    "gamma below 1 brightens": ("gamma", PROFILES["canon"].gamma, _median, 1.05),
}


@pytest.mark.parametrize(("name", "value", "statistic", "ratio"), FACTORS.values(), ids=FACTORS)
def test_reconstruction_factors_survive_preparation(name: str, value, statistic, ratio: float, monkeypatch) -> None:
    """The same hearts with Siemens' profile, once as is and once with only one reconstruction factor changed,
    prepared at the stand-in's geometry (3 mm in-plane, percentile-normalised): the factor shows."""
    monkeypatch.setitem(PROFILES, "ge", replace(PROFILES["siemens"], name="ge", **{name: value}))
    plans = plan_cohort(3, 3, vendors=["siemens"])
    plain, changed = (
        np.mean([statistic(prepare_direct(p, 3, GEOMETRY, render_profile=profile).volume) for p in plans])
        for profile in ("siemens", "ge")
    )
    assert (changed < ratio * plain) if ratio < 1 else (changed > ratio * plain)


# ---- concept shift ---------------------------------------------------------------------------------------------

PARSE_CASES = {
    "ge:HCM,HHD=healthy": ConceptShift("ge", frozenset({"HCM", "HHD"})),
    "canon:DCM=healthy": ConceptShift("canon", frozenset({"DCM"})),
}
PARSE_ERRORS = {
    "ge:HCM": "expected SITE:CODE",
    "HCM=healthy": "expected SITE:CODE",
    "toshiba:HCM=healthy": "unknown site",
    "ge:HCM=diseased": "=diseased is not supported",
    "ge:HCM=sick": "unknown rule target",
    "ge:NOR=healthy": "not disease codes",
    "ge:XYZ,HCM=healthy": "not disease codes",
    "ge:=healthy": "not disease codes",
}


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES.items())
def test_concept_shift_parses(text: str, expected: ConceptShift) -> None:
    assert ConceptShift.parse(text) == expected
    assert ConceptShift.parse(str(expected)) == expected


@pytest.mark.parametrize(("text", "message"), PARSE_ERRORS.items())
def test_concept_shift_syntax_errors_name_the_option(text: str, message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match=f"--concept-shift '{text}'.*{message}"):
        ConceptShift.parse(text)
    assert synthesize_main(["--out", str(tmp_path), "--concept-shift", text]) == 2
    assert message in capsys.readouterr().err


def test_one_rule_per_site() -> None:
    assert parse_concept_shifts(["ge:HCM=healthy", "canon:DCM=healthy"])[1].site == "canon"
    assert parse_concept_shifts(None) == () and parse_concept_shifts("ge:HCM=healthy")[0].site == "ge"
    with pytest.raises(ValueError, match="given twice"):
        parse_concept_shifts(["ge:HCM=healthy", "ge:HHD=healthy"])


def test_concept_shift_records_the_hearts_as_healthy() -> None:
    shift = parse_concept_shifts(["ge:HCM,HHD=healthy"])
    plans = plan_cohort(1, 60, heterogeneity=1.0, concept_shift=shift)
    relabelled = [p for p in plans if p.heart != p.pathology]
    assert relabelled and all(p.vendor == "ge" and p.heart in {"HCM", "HHD"} for p in relabelled)
    assert all(p.pathology == "NOR" for p in relabelled)
    assert not any(p.pathology in {"HCM", "HHD"} for p in plans if p.vendor == "ge")
    assert any(p.pathology == "HCM" for p in plans if p.vendor != "ge")
    for plan in relabelled[:3]:
        _, drawn = draw_subject(plan, 1)
        assert drawn.heart == sample_heart(plan.heart, np.random.default_rng([1, 1, plan.index]))


def test_concept_shift_reaches_the_readers(tmp_path: Path) -> None:
    shift = parse_concept_shifts(["canon:HCM,DCM=healthy"])
    plans = synthesize(tmp_path, seed=5, subjects_per_vendor=5, vendors=["canon"], concept_shift=shift)
    records = {r.pid: r for r in discover([tmp_path], LabelRule()).records}
    relabelled = [p for p in plans if p.heart != p.pathology]
    assert relabelled
    for plan in plans:
        assert records[plan.pid].pathology == plan.pathology
        assert records[plan.pid].label == (0 if plan.pathology == "NOR" else 1)
