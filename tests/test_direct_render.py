"""The direct path gives the prepared volumes of synthesize + prepare bit for bit, without files, under either
noise scheme."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.anatomy import sample_heart
from data_prep.direct import geometry_from_args, prepare_direct, stored_affine
from data_prep.phantom import FrameNoise, render_four_chamber, render_sax, sample_acquisition
from data_prep.prepare import run_prepare
from data_prep.preprocess import preprocess_arrays, read_volume, stored_volume, to_uint8, write_volume
from data_prep.records import LV_LABEL
from data_prep.report import read_manifest
from data_prep.synthesize import NOISE_STREAMS, cine_noise, plan_cohort, synthesize
from data_prep.synthesize import main as synthesize_main
from data_prep.vendors import PROFILES
from models.protocol import SITES
from models.standin import prepare_args

GEOMETRY = geometry_from_args(prepare_args())
CASES = {
    # 3 per vendor: ACDC, M&Ms-1 with a sheared (non-orthonormal) and an unlabelled subject, M&Ms-2. The shear is
    # drawn by the main generator, after the noise in the default scheme, so the per-frame case needs another seed.
    "h=1": (1, 3, SITES, 1.0, None, False),
    "h=1, per-frame noise": (2, 3, SITES, 1.0, None, True),
    "h=0.5": (1, 2, ("siemens", "ge"), 0.5, None, False),
    "h=1.5, philips profile": (2, 2, ("siemens", "canon"), 1.5, "philips", False),
}


def _sheared(path: Path) -> bool:
    directions = nib.load(path).affine[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return abs(float(directions[:, 0] @ directions[:, 1])) > 1e-3


@pytest.mark.parametrize(
    ("seed", "per_vendor", "vendors", "heterogeneity", "profile", "frame_noise"), CASES.values(), ids=CASES
)
def test_direct_path_equals_synthesize_and_prepare(
    seed: int,
    per_vendor: int,
    vendors: tuple[str, ...],
    heterogeneity: float,
    profile: str | None,
    frame_noise: bool,
    tmp_path: Path,
) -> None:
    plans = synthesize(tmp_path / "raw", seed, per_vendor, 2, vendors, profile, heterogeneity, (), frame_noise)
    result = run_prepare([tmp_path / "raw"], tmp_path / "prepared", seed=0, geometry=GEOMETRY, workers=2)
    assert not result.problems
    rows = {row["subject_id"]: row for row in read_manifest(tmp_path / "prepared" / "manifest.csv")}
    assert len(rows) == len(plans)
    for plan in plans:
        row = rows[f"{plan.dataset}_{plan.pid}"]
        from_files = to_uint8(read_volume(tmp_path / "prepared" / row["image"]))
        direct = prepare_direct(plan, seed, GEOMETRY, heterogeneity, profile, frame_noise)
        assert np.array_equal(to_uint8(stored_volume(direct)), from_files), row["subject_id"]
        assert (direct.n_slices, direct.crop_method) == (int(row["n_slices"]), row["crop_method"])
    if heterogeneity == 1.0:  # the cohort covers every layout and quirk the direct path reproduces
        assert {plan.dataset for plan in plans} == {"acdc", "mnms", "mnms2"}
        assert any(_sheared(path) for path in (tmp_path / "raw" / "MnM").rglob("*_sa.nii.gz"))
        assert {row["crop_method"] for row in rows.values()} == {"lv_label", "motion"}


def _acquisition(rng: np.random.Generator):
    heart = sample_heart("DCM", rng)
    return heart, sample_acquisition(PROFILES["ge"], heart, rng, 10.0, (12, 12), False, 0.0, np.random.default_rng(8))


def test_rendering_some_frames_gives_those_frames_and_consumes_the_generator_alike() -> None:
    def render(frames: tuple[int, ...] | None):
        rng = np.random.default_rng(7)
        heart, acq = _acquisition(rng)
        return acq, render_sax(heart, acq, rng, frames), rng.random()

    acq, full, after_full = render(None)
    _, some, after_some = render((acq.es, acq.ed))
    assert some.signal.shape[3] == 2 and after_some == after_full
    for frame in (acq.ed, acq.es):
        assert np.array_equal(some.frame(frame), full.frame(frame))
        assert np.array_equal(some.labels[frame], full.labels[frame])


def _recorded(asked: list[int]) -> FrameNoise:
    """Per-frame generators that record which frames asked for theirs."""

    def noise(frame: int) -> np.random.Generator:
        asked.append(frame)
        return np.random.default_rng([7, frame])

    return noise


def test_per_frame_noise_draws_only_the_rendered_frames() -> None:
    """Each frame's noise comes from its own generator: rendering some frames asks only theirs and gives the values
    of the whole cine; the 4-chamber view asks every frame's."""
    heart, acq = _acquisition(np.random.default_rng(7))
    asked_full: list[int] = []
    asked_some: list[int] = []
    full = render_sax(heart, acq, _recorded(asked_full))
    some = render_sax(heart, acq, _recorded(asked_some), (acq.es, acq.ed))
    assert asked_full == list(range(acq.n_frames)) and asked_some == [acq.es, acq.ed]
    for frame in (acq.ed, acq.es):
        assert np.array_equal(some.frame(frame), full.frame(frame))
    asked_lax: list[int] = []
    render_four_chamber(heart, acq, _recorded(asked_lax))
    assert asked_lax == list(range(acq.n_frames))


def test_frame_noise_generators_are_the_subjects_own() -> None:
    """One stream per (seed, view, subject, frame), apart from each other and from every other generator of the
    cohort (numpy seeds a short key and the key padded with zeros alike, so stream words 0-4 would collide)."""
    main = np.random.default_rng(3)
    plans = plan_cohort(0, 1)[:2]
    firsts = [
        cine_noise(plan, seed, view, main, True)(frame).random()
        for seed in (0, 1)
        for view in NOISE_STREAMS
        for plan in plans
        for frame in (0, 1)
    ]
    assert len(set(firsts)) == len(firsts) == 16
    others = {
        np.random.default_rng([seed, word, *rest]).random()
        for seed in (0, 1)
        for word in range(5)
        for rest in ([], [0], [1], [0, 0], [1, 0])
    }
    assert not set(firsts) & others
    assert cine_noise(plans[0], 0, "sax", main, False) is main


def test_stored_affine_and_volume_match_a_written_file(tmp_path: Path) -> None:
    affine = np.array([[1.3, 0.2, 0.1, -99.123456789], [0.1, 1.2, 0.3, 12.3], [0.05, 0.04, 9.7, 1 / 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ones((3, 3, 2), np.int16), affine), tmp_path / "a.nii.gz")
    assert np.array_equal(stored_affine(affine), nib.load(tmp_path / "a.nii.gz").affine)
    assert not np.array_equal(stored_affine(affine), affine)
    prepared = prepare_direct(plan_cohort(0, 1, vendors=["canon"])[0], 0, GEOMETRY)
    prepared.volume[...] = np.random.default_rng(0).random(prepared.volume.shape, dtype=np.float32)
    write_volume(prepared, tmp_path / "v.nii.gz")
    assert np.array_equal(stored_volume(prepared), read_volume(tmp_path / "v.nii.gz"))


def test_cli_frame_noise_option(tmp_path: Path) -> None:
    """`--frame-noise` writes the per-frame scheme's files (the same acquisition as the default's, other noise)."""
    arguments = ["--subjects-per-vendor", "1", "--vendors", "canon", "--seed", "4"]
    assert synthesize_main(["--out", str(tmp_path / "cli"), *arguments, "--frame-noise"]) == 0
    synthesize(tmp_path / "api", 4, 1, vendors=["canon"], frame_noise=True)
    synthesize(tmp_path / "default", 4, 1, vendors=["canon"])
    (path,) = (p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*_sa.nii.gz"))
    cli, api, default = (nib.load(tmp_path / name / path) for name in ("cli", "api", "default"))
    assert np.array_equal(cli.get_fdata(), api.get_fdata()) and np.array_equal(cli.affine, api.affine)
    assert cli.shape == default.shape and not np.array_equal(cli.get_fdata(), default.get_fdata())


GEOMETRY_ERRORS = {
    "another option": (["--crop", "64", "64", "--seed", "3"], "not allowed"),
    "missing value": (["--crop", "64"], "not valid"),
    "not a number": (["--depth", "eight"], "not valid"),
}


def test_geometry_from_prepare_options() -> None:
    assert (GEOMETRY.crop, GEOMETRY.spacing, GEOMETRY.depth) == ((64, 64), (3.0, 3.0, 10.0), 8)
    assert geometry_from_args([]).crop == (192, 192)


@pytest.mark.parametrize(("arguments", "message"), GEOMETRY_ERRORS.values(), ids=GEOMETRY_ERRORS)
def test_geometry_options_errors(arguments: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        geometry_from_args(arguments)


def test_shared_preprocessing_treats_a_label_without_lv_as_none() -> None:
    """preprocess_arrays, shared by prepare and the direct path, crops by the LV label only when it has an LV."""
    images = np.random.default_rng(0).random((2, 30, 30, 4), dtype=np.float32)
    images[1, 5:12, 5:12] += 3.0  # the ED-ES change the motion fallback finds
    label = np.zeros((30, 30, 4), dtype=np.uint8)
    label[20:24, 20:24] = 1  # RV only
    geometry = geometry_from_args(["--crop", "8", "8", "--spacing", "1", "1", "10", "--depth", "4"])
    affine = np.diag([1.0, 1.0, 10.0, 1.0])
    without_lv = preprocess_arrays(images, label, affine, geometry, "raw", ("ED", "ES"))
    assert without_lv.crop_method == "motion"
    label[20:24, 20:24] = LV_LABEL
    assert preprocess_arrays(images, label, affine, geometry, "raw", ("ED", "ES")).crop_method == "lv_label"
