"""NIfTI reading with explicit checks (readable, dimensions, frame range, finite, not constant) and atomic writing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.records import FrameRef, InputError
from models.atomic_io import atomic_path

PARTIAL_SUFFIX = ".partial.nii.gz"


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Whole array (any dtype) and affine of a NIfTI file; unreadable or truncated files raise InputError."""
    if not path.is_file():
        raise InputError(path, "file is missing")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel, gzip and zlib raise many different types for corrupt files
        raise InputError(path, f"unreadable or truncated NIfTI ({type(error).__name__}: {error})") from error
    return data, np.asarray(image.affine, dtype=np.float64)


def _select_frame(data: np.ndarray, ref: FrameRef) -> np.ndarray:
    """The 3D frame `ref` points at; wrong dimensionality or an out-of-range index raises InputError."""
    if ref.frame is None:
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputError(ref.path, f"expected a 3D image (x, y, z), got {data.ndim} dimensions {data.shape}")
        return data
    if data.ndim != 4:
        raise InputError(ref.path, f"expected a 4D image (x, y, z, t), got {data.ndim} dimensions {data.shape}")
    n_frames = data.shape[3]
    if not 0 <= ref.frame < n_frames:
        raise InputError(
            ref.path, f"frame index {ref.frame} out of range [0, {n_frames}) ({ref.frame_field or 'frame index'})"
        )
    return data[..., ref.frame]


def read_frames(refs: list[FrameRef], is_label: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """Load frames (float32 images or uint8 remapped labels) and the affine, reading each file once."""
    cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    frames: list[np.ndarray] = []
    affine = np.eye(4)
    for ref in refs:
        if ref.path not in cache:
            cache[ref.path] = _read_file(ref.path)
        data, affine = cache[ref.path]
        frame = _select_frame(data, ref)
        frames.append(_as_label(frame, ref) if is_label else _as_image(frame, ref))
    return frames, affine


def _as_image(frame: np.ndarray, ref: FrameRef) -> np.ndarray:
    """Image frame as float32; NaN/inf or constant frames raise InputError."""
    image = np.asarray(frame, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise InputError(ref.path, f"image {ref.description} contains NaN or infinite values")
    if image.size == 0 or float(image.max()) == float(image.min()):
        raise InputError(ref.path, f"image {ref.description} is constant (no contrast)")
    return image


def _as_label(frame: np.ndarray, ref: FrameRef) -> np.ndarray:
    """Label frame remapped to the unified map (RV 1, MYO 2, LV 3) as uint8."""
    values = np.asarray(frame)
    if not np.all(np.isfinite(values)):
        raise InputError(ref.path, f"label map {ref.description} contains NaN or infinite values")
    labels = np.rint(values).astype(np.int64)
    unexpected = sorted(set(np.unique(labels).tolist()) - {0, 1, 2, 3})
    if unexpected:
        raise InputError(ref.path, f"label map {ref.description} has values {unexpected} outside 0-3")
    if ref.label_map is None:
        return labels.astype(np.uint8)
    lookup = np.arange(4, dtype=np.uint8)
    for source, target in ref.label_map.items():
        lookup[source] = target
    return lookup[labels]


def save_atomic(image: nib.Nifti1Image, path: Path) -> None:
    """Write `image` under a temporary name in its folder, then rename: a crash never leaves a valid-looking file."""
    with atomic_path(path, suffix=PARTIAL_SUFFIX) as temporary:
        nib.save(image, str(temporary))
