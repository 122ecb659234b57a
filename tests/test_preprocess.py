"""Preprocessing: real CineMA examples through the preprocessed path, affine handling, dtypes, crop, intensity, z."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.prepare import main as prepare_main
from data_prep.preprocess import Geometry, preprocess, read_volume, write_volume
from data_prep.readers import discover
from data_prep.records import LV_LABEL, FrameRef, LabelRule, SubjectRecord
from data_prep.report import read_manifest
from tests.conftest import EXAMPLES

EXAMPLE_AXCODES = {"acdc": ("L", "P", "S"), "mnms": ("P", "I", "L"), "mnms2": ("I", "R", "A")}


def _examples(root: Path) -> dict[str, SubjectRecord]:
    return {r.dataset: r for r in discover([root], LabelRule()).records}


@pytest.mark.parametrize("dataset", ["acdc", "mnms", "mnms2"])
def test_real_example_default_geometry(cinema_examples: Path, dataset: str) -> None:
    record = _examples(cinema_examples)[dataset]
    source = nib.load(EXAMPLES / dataset / "sax_ed.nii.gz")
    prepared = preprocess(record, Geometry())
    n_slices = source.shape[2]
    assert prepared.volume.shape == (192, 192, 16, 2) and prepared.n_slices == n_slices
    assert prepared.volume.min() == 0.0 and prepared.volume.max() == 1.0
    assert prepared.crop_method == "centre" and prepared.original_spacing == pytest.approx((1.0, 1.0, 10.0))
    np.testing.assert_allclose(prepared.affine, source.affine, atol=1e-4)
    assert nib.aff2axcodes(prepared.affine) == EXAMPLE_AXCODES[dataset]
    raw = np.asanyarray(source.dataobj).astype(np.float32)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(prepared.volume[:, :, :n_slices, 0], expected, atol=1e-6)
    assert not prepared.volume[:, :, n_slices:, :].any()


@pytest.mark.parametrize("dataset", ["acdc", "mnms", "mnms2"])
def test_real_example_small_geometry_keeps_orientation(cinema_examples: Path, dataset: str) -> None:
    record = _examples(cinema_examples)[dataset]
    source = nib.load(EXAMPLES / dataset / "sax_ed.nii.gz")
    prepared = preprocess(record, Geometry(crop=(64, 64), depth=8))
    assert prepared.volume.shape == (64, 64, 8, 2)
    z_start = round((source.shape[2] - 1) / 2 - 3.5)
    expected_origin = source.affine @ np.array([64, 64, z_start, 1.0])
    np.testing.assert_allclose(prepared.affine[:, 3], expected_origin, atol=1e-4)
    np.testing.assert_allclose(prepared.affine[:3, :3], source.affine[:3, :3], atol=1e-6)
    assert nib.aff2axcodes(prepared.affine) == EXAMPLE_AXCODES[dataset]


def test_real_examples_through_prepare_cli(cinema_examples: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    code = prepare_main(["--raw", str(cinema_examples), "--out", str(out), "--crop", "64", "64", "--depth", "8"])
    rows = read_manifest(out / "manifest.csv")
    assert code == 0 and len(rows) == 3 and {r["layout"] for r in rows} == {"cinema"}
    for row in rows:
        volume = read_volume(out / row["image"])
        assert volume.shape == (2, 64, 64, 8) and volume.dtype == np.float32
        assert 0.0 <= volume.min() and volume.max() <= 1.0
        assert nib.load(out / row["image"]).get_data_dtype() == np.uint8


def _oblique_sheared_affine() -> np.ndarray:
    """Double-oblique rotation whose second column is sheared (non-orthonormal, as some M&Ms-1 files)."""
    first, second = np.deg2rad(35), np.deg2rad(-50)
    about_z = np.array([[np.cos(first), -np.sin(first), 0], [np.sin(first), np.cos(first), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(second), -np.sin(second)], [0, np.sin(second), np.cos(second)]])
    directions = about_x @ about_z
    directions[:, 1] += 0.04 * directions[:, 0]
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag([1.6, 1.4, 8.0])
    affine[:3, 3] = [-40.0, 25.0, 110.0]
    return affine


def _write_subject(
    folder: Path, affine: np.ndarray, dtype: type = np.int16, with_label: bool = True, shape=(120, 110, 9)
) -> SubjectRecord:
    """Two frames with a bright 'LV' blob (smaller at ES) at voxel (70, 50, 4), plus its label."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    distance = np.linalg.norm((grid - [70, 50, 4]) * [1.6, 1.4, 8.0], axis=-1)
    background = 200 + 0.5 * grid[..., 0]
    frames = [np.where(distance < radius, 900.0, background) for radius in (16.0, 11.0)]
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for name, frame in zip(("ed", "es"), frames, strict=True):
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(frame.astype(dtype), affine), path)
        refs.append(FrameRef(path))
    label = None
    if with_label:
        nib.save(
            nib.Nifti1Image(np.where(distance < 16.0, LV_LABEL, 0).astype(np.uint8), affine), folder / "gt.nii.gz"
        )
        label = FrameRef(folder / "gt.nii.gz")
    return SubjectRecord("p1", "acdc", "siemens", "c", "NOR", 0, refs[0], refs[1], label, None, "raw", folder)


def test_oblique_non_orthonormal_affine_is_honoured(tmp_path: Path) -> None:
    affine = _oblique_sheared_affine()
    record = _write_subject(tmp_path / "s", affine)
    prepared = preprocess(record, Geometry(crop=(64, 64), depth=16))
    assert prepared.crop_method == "lv_label"
    assert np.linalg.norm(prepared.affine[:3, :3], axis=0) == pytest.approx([1.0, 1.0, 10.0], abs=1e-4)
    bright = np.argwhere(prepared.volume[..., 0] > 0.5).mean(axis=0)
    world = prepared.affine @ np.append(bright, 1.0)
    expected = affine @ np.array([70.0, 50.0, 4.0, 1.0])
    assert np.linalg.norm(world[:3] - expected[:3]) < 3.0
    assert bright[:2] == pytest.approx([31.5, 31.5], abs=1.5)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    out_directions = prepared.affine[:3, :3] / np.linalg.norm(prepared.affine[:3, :3], axis=0)
    assert np.dot(directions[:, 2], out_directions[:, 2]) > 0.99


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float64, np.float32])
def test_any_dtype_gives_the_same_result(tmp_path: Path, dtype: type) -> None:
    affine = np.diag([1.6, 1.4, 8.0, 1.0])
    reference = preprocess(_write_subject(tmp_path / "int16", affine), Geometry(crop=(64, 64), depth=8))
    scaled = _write_subject(tmp_path / "other", affine, dtype=np.float32)
    if dtype is np.uint8:
        for ref in (scaled.ed_image, scaled.es_image):
            image = nib.load(ref.path)
            nib.save(nib.Nifti1Image((image.get_fdata() / 4).astype(np.uint8), affine), ref.path)
    else:
        for ref in (scaled.ed_image, scaled.es_image):
            image = nib.load(ref.path)
            nib.save(nib.Nifti1Image(image.get_fdata().astype(dtype), affine), ref.path)
    other = preprocess(scaled, Geometry(crop=(64, 64), depth=8))
    np.testing.assert_allclose(other.volume, reference.volume, atol=0.02)


def test_percentile_clipping_ignores_outliers(tmp_path: Path) -> None:
    affine = np.diag([1.6, 1.4, 8.0, 1.0])
    record = _write_subject(tmp_path / "s", affine, dtype=np.float32)
    image = nib.load(record.ed_image.path)
    data = image.get_fdata().astype(np.float32)
    data[70, 50, 4] = 1e6
    nib.save(nib.Nifti1Image(data, affine), record.ed_image.path)
    prepared = preprocess(record, Geometry(crop=(64, 64), depth=8))
    ed = prepared.volume[..., 0]
    assert ed.max() == 1.0 and np.median(ed[ed > 0.5]) == pytest.approx(1.0)
    assert (ed > 0.9).sum() > 100


def test_depth_padding_at_the_end_and_z_crop_around_lv(tmp_path: Path) -> None:
    affine = np.diag([1.6, 1.4, 8.0, 1.0])
    record = _write_subject(tmp_path / "s", affine)
    padded = preprocess(record, Geometry(crop=(64, 64), depth=16))
    n = padded.n_slices
    assert n == 7 and padded.volume[:, :, :n].any(axis=(0, 1)).all() and not padded.volume[:, :, n:].any()
    cropped = preprocess(record, Geometry(crop=(64, 64), depth=3))
    assert cropped.volume.shape[2] == 3
    lv_slice = 32.0 / 10.0
    world_z = [(cropped.affine @ [32, 32, k, 1])[2] for k in range(3)]
    assert min(world_z) <= (padded.affine @ [32, 32, lv_slice, 1])[2] <= max(world_z)


def test_small_image_is_padded_symmetrically_in_plane(tmp_path: Path) -> None:
    record = _write_subject(tmp_path / "s", np.diag([1.6, 1.4, 8.0, 1.0]))
    prepared = preprocess(record, Geometry(crop=(256, 256), depth=8))
    filled = np.argwhere(prepared.volume[..., 0].any(axis=2))
    width = 120 * 1.6
    assert filled[:, 0].min() == pytest.approx((256 - width) / 2, abs=2)


def test_fallback_crop_without_label(tmp_path: Path) -> None:
    record = _write_subject(tmp_path / "s", np.diag([1.6, 1.4, 8.0, 1.0]), with_label=False)
    moving = preprocess(record, Geometry(crop=(64, 64), depth=8))
    assert moving.crop_method == "motion"
    assert np.argwhere(moving.volume[..., 0] > 0.5).mean(axis=0)[:2] == pytest.approx([31.5, 31.5], abs=3)
    still = SubjectRecord(
        "p1", "acdc", "siemens", "c", "NOR", 0, record.ed_image, record.ed_image, layout="raw", source=record.source
    )
    assert preprocess(still, Geometry(crop=(64, 64), depth=8)).crop_method == "centre"


def test_written_volume_reads_back_in_unit_range(tmp_path: Path) -> None:
    record = _write_subject(tmp_path / "s", np.diag([1.6, 1.4, 8.0, 1.0]))
    prepared = preprocess(record, Geometry(crop=(64, 64), depth=8))
    path = tmp_path / "out" / "v.nii.gz"
    write_volume(prepared, path)
    loaded = read_volume(path)
    assert loaded.shape == (2, 64, 64, 8) and loaded.min() >= 0.0 and loaded.max() <= 1.0
    np.testing.assert_allclose(loaded, np.moveaxis(prepared.volume, 3, 0), atol=1 / 255)
    assert not list(path.parent.glob(".*"))
