"""Preprocessing to the CineMA input contract: ED+ES, resample (MONAI, affine-aware), LV crop, intensity, z pad.

Steps for one subject (reference-cinema.md §3):
1. load ED and ES (any dtype → float32) and the ED label when present (remapped to RV 1, MYO 2, LV 3);
2. resample to `spacing` with MONAI `Spacingd` (bilinear images, nearest labels) using the file's affine as it is:
   oblique and non-orthonormal affines are honoured, nothing is reoriented to RAS, voxel axes stay (x, y in-plane, z
   across slices). CineMA-preprocessed inputs already at the target spacing are not resampled;
3. crop `crop` in-plane around the ED LV bounding-box centre (CineMA: the window is shifted to stay inside the image;
   images smaller than the crop are zero-padded symmetrically). Fallback without a usable LV label: for raw data the
   centre of the ED-ES motion (smoothed |ED - ES|, top 1 % of pixels), else the image centre; for CineMA-preprocessed
   inputs (already LV-centred) the image centre. With more slices than `depth`, the `depth` slices around the LV
   (else the middle ones) are kept;
4. per frame, clip to the 0.95 / 99.5 percentiles and rescale to [0, 1] (inputs already normalised by CineMA are only
   min-max rescaled, like CineMA's online `ScaleIntensityd`);
5. zero-pad z at the end to `depth`.
Output: one array (X, Y, Z, 2), channels ED and ES, and its affine (the crop moves the origin, never the axes).
Steps 2-5 (`preprocess_arrays`) are shared with the synthetic cohort's direct path (data_prep/direct.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd
from scipy.ndimage import uniform_filter

from data_prep.nifti import check_same_geometry, read_frames, save_atomic
from data_prep.records import LV_LABEL, InputError, SubjectRecord

MOTION_WINDOW_MM = 30.0
MOTION_TOP_FRACTION = 0.01


@dataclass(frozen=True)
class Geometry:
    """Target geometry: in-plane crop (voxels), spacing (mm) and depth (slices). Defaults are CineMA's."""

    crop: tuple[int, int] = (192, 192)
    spacing: tuple[float, float, float] = (1.0, 1.0, 10.0)
    depth: int = 16

    def __post_init__(self) -> None:
        if len(self.crop) != 2 or min(self.crop) < 1 or self.depth < 1:
            raise ValueError(f"crop {self.crop} and depth {self.depth} must be positive (crop has two values)")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing {self.spacing} must be three positive values (mm)")


@dataclass
class PreparedVolume:
    """A preprocessed subject: `volume` (X, Y, Z, 2) float32 in [0, 1], its affine and how it was made."""

    volume: np.ndarray
    affine: np.ndarray
    n_slices: int
    original_spacing: tuple[float, float, float]
    crop_method: str


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis: the norms of the affine's columns (valid for oblique and sheared affines)."""
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return float(norms[0]), float(norms[1]), float(norms[2])


def _load(record: SubjectRecord) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """ED/ES stacked as (2, X, Y, Z), the ED label (X, Y, Z) or None, and the affine."""
    (ed, es), affine = read_frames([record.ed_image, record.es_image], is_label=False)
    if ed.shape != es.shape:
        raise InputError(record.es_image.path, f"ES shape {es.shape} differs from ED shape {ed.shape}")
    if ed.shape[0] < 2 or ed.shape[1] < 2:
        raise InputError(record.ed_image.path, f"image of shape {ed.shape} is not a short-axis stack")
    label = None
    if record.ed_label is not None:
        (label,), label_affine = read_frames([record.ed_label], is_label=True)
        if label.shape != ed.shape:
            raise InputError(record.ed_label.path, f"label shape {label.shape} differs from image shape {ed.shape}")
        check_same_geometry(record.ed_label.path, label_affine, record.ed_image.path, affine)
    return np.stack([ed, es]), label, affine


def _resample(
    images: np.ndarray, label: np.ndarray | None, affine: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resample with MONAI Spacingd (bilinear images, nearest label), honouring the affine as given."""
    data = {"image": MetaTensor(torch.from_numpy(images), affine=torch.from_numpy(affine))}
    keys, modes = ["image"], ["bilinear"]
    if label is not None:
        data["label"] = MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=torch.from_numpy(affine))
        keys.append("label")
        modes.append("nearest")
    resampled = Spacingd(keys=keys, pixdim=spacing, mode=modes, dtype=torch.float32)(data)
    out_images = resampled["image"].numpy().astype(np.float32, copy=False)
    out_label = resampled["label"].numpy()[0].round().astype(np.uint8) if label is not None else None
    return out_images, out_label, resampled["image"].affine.numpy().astype(np.float64)


def _motion_centre(images: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float] | None:
    """In-plane centre of the strongest ED-ES change (the beating heart); None when nothing moves."""
    motion = np.abs(images[0] - images[1]).sum(axis=2)
    size = [max(1, round(MOTION_WINDOW_MM / s)) for s in spacing[:2]]
    smooth = uniform_filter(motion, size=size, mode="constant")
    if float(smooth.max()) <= 0.0:
        return None
    threshold = np.quantile(smooth, 1.0 - MOTION_TOP_FRACTION)
    xs, ys = np.nonzero(smooth >= threshold)
    return float(xs.mean()), float(ys.mean())


def _crop_centre(
    images: np.ndarray, label: np.ndarray | None, layout: str, spacing: tuple[float, float, float]
) -> tuple[tuple[float, float, float], str]:
    """Voxel centre (x, y, z) of the crop window and the method that chose it."""
    shape = images.shape[1:]
    middle = ((shape[0] - 1) / 2, (shape[1] - 1) / 2, (shape[2] - 1) / 2)
    if label is not None:
        coords = np.nonzero(label == LV_LABEL)
        centre = tuple((float(c.min()) + float(c.max())) / 2 for c in coords)
        return (centre[0], centre[1], centre[2]), "lv_label"
    if layout == "raw":
        moving = _motion_centre(images, spacing)
        if moving is not None:
            return (moving[0], moving[1], middle[2]), "motion"
    return middle, "centre"


def _window_start(centre: float, size: int, target: int, pad_at_end: bool) -> int:
    """First index of a `target`-long window around `centre`, kept inside the image when the image is long enough."""
    if size >= target:
        return int(min(max(round(centre - (target - 1) / 2), 0), size - target))
    return 0 if pad_at_end else -((target - size) // 2)


def _normalise(values: np.ndarray, already_normalised: bool, path: Path) -> np.ndarray:
    """Clip to the 0.95 / 99.5 percentiles and rescale to [0, 1] (min-max only for already-normalised inputs)."""
    if already_normalised:
        low, high = float(values.min()), float(values.max())
    else:
        low, high = (float(v) for v in np.percentile(values, [0.95, 99.5]))
    if high <= low:
        raise InputError(path, "image is constant inside the crop window (no contrast)")
    return (np.clip(values, low, high) - low) / (high - low)


def preprocess(record: SubjectRecord, geometry: Geometry) -> PreparedVolume:
    """Run the whole pipeline on one subject."""
    images, label, affine = _load(record)
    sources = (record.ed_image.path, record.es_image.path)
    return preprocess_arrays(images, label, affine, geometry, record.layout, sources)


def preprocess_arrays(
    images: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    geometry: Geometry,
    layout: str,
    sources: Sequence[Path | str],
) -> PreparedVolume:
    """Steps 2-5 on loaded arrays: ED/ES `images` (2, X, Y, Z) float32, the unified ED `label` (X, Y, Z) uint8 or
    None (a label without LV counts as none), their float64 `affine`; `sources` name the ED and ES in errors."""
    if label is not None and not np.any(label == LV_LABEL):
        label = None
    original_spacing = voxel_spacing(affine)
    if not np.allclose(original_spacing, geometry.spacing, rtol=1e-3):
        images, label, affine = _resample(images, label, affine, geometry.spacing)
    centre, method = _crop_centre(images, label, layout, geometry.spacing)
    shape = images.shape[1:]
    targets = (*geometry.crop, geometry.depth)
    starts = [_window_start(centre[axis], shape[axis], targets[axis], pad_at_end=axis == 2) for axis in range(3)]
    source = tuple(slice(max(s, 0), min(s + t, n)) for s, t, n in zip(starts, targets, shape, strict=True))
    target = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(source, starts, strict=True))
    volume = np.zeros((*targets, 2), dtype=np.float32)
    for channel, path in enumerate(sources):
        window = images[channel][source]
        volume[(*target, channel)] = _normalise(window, layout == "cinema", path)
    shift = np.eye(4)
    shift[:3, 3] = starts
    return PreparedVolume(volume, affine @ shift, int(shape[2]), original_spacing, method)


def _volume_image(prepared: PreparedVolume) -> nib.Nifti1Image:
    """The NIfTI image of a prepared volume: (X, Y, Z, 2) stored as scaled uint8 (reads back as floats in [0, 1])."""
    image = nib.Nifti1Image(prepared.volume, prepared.affine)
    image.set_data_dtype(np.uint8)
    image.header.set_xyzt_units("mm", "sec")
    return image


def write_volume(prepared: PreparedVolume, path: Path) -> None:
    """Save as NIfTI (X, Y, Z, 2) stored as scaled uint8 (reads back as floats in [0, 1]), atomically."""
    save_atomic(_volume_image(prepared), path)


def _channels_first(image: nib.Nifti1Image) -> np.ndarray:
    """A prepared volume's image as float32 (2, X, Y, Z) in [0, 1]."""
    return np.clip(np.moveaxis(image.get_fdata(dtype=np.float32), 3, 0), 0.0, 1.0)


def read_volume(path: Path) -> np.ndarray:
    """A prepared volume as float32 (2, X, Y, Z) in [0, 1]."""
    return _channels_first(nib.load(str(path)))


def stored_volume(prepared: PreparedVolume) -> np.ndarray:
    """What `read_volume` gives for `prepared` once written (uint8 storage and scaling included), without a file."""
    image = _volume_image(prepared)
    return _channels_first(nib.Nifti1Image.from_bytes(image.to_bytes()))


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """A volume read back in [0, 1] as the uint8 the data module holds (exact for stored volumes)."""
    return np.rint(volume * 255).astype(np.uint8)
