"""NIfTI reading with explicit checks (readable, real voxel type, voxel size, dimensions, frame range, finite, not
constant) and atomic writing."""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from nibabel.spatialimages import SpatialImage

from data_prep.records import FrameRef, InputError
from models.atomic_io import atomic_path

PARTIAL_SUFFIX = ".partial.nii.gz"
REAL_KINDS = "uif"
"""numpy dtype kinds of real scalar voxels: unsigned and signed integers, floats."""
AFFINE_RTOL, AFFINE_ATOL = 1e-3, 1e-2
"""Tolerance (relative, mm) within which two files of one subject share their geometry."""


def _check_present(path: Path) -> None:
    """Raise InputError for a missing file, a dangling symbolic link, a symbolic link loop or a folder."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InputError(path, "symbolic link loop (the link resolves back to itself)") from None
        if path.is_symlink():
            raise InputError(path, f"dangling symbolic link (to {os.readlink(path)})") from None
        raise InputError(path, "file is missing") from None
    if not path.is_file():
        raise InputError(path, "not a regular file (a folder or a device)")


def _check_voxel_type(path: Path, image: SpatialImage) -> None:
    """Only real scalar voxels: complex, RGB/RGBA and other structured types raise InputError naming `datatype`."""
    dtype = image.get_data_dtype()
    if dtype.fields is None and dtype.kind in REAL_KINDS:
        return
    code = image.header["datatype"] if "datatype" in image.header else "?"
    raise InputError(
        path,
        f"header field datatype = {code} ({dtype}): voxels are not real scalars "
        "(complex, RGB and other structured types are not supported)",
    )


def _stored_pixdim(path: Path, image: SpatialImage) -> np.ndarray | None:
    """pixdim as stored in the file (on loading, nibabel silently turns 0 into 1 and negatives into their absolute)."""
    if "pixdim" not in image.header:
        return None
    try:
        with ImageOpener(str(path)) as handle:
            return type(image.header).from_fileobj(handle, check=False)["pixdim"]
    except Exception as error:  # same corrupt-file errors as nib.load
        raise InputError(path, f"unreadable NIfTI header ({type(error).__name__}: {error})") from error


def _check_voxel_size(path: Path, image: SpatialImage) -> None:
    """Spatial pixdim positive and finite, the affine finite and not degenerate; else InputError naming the field."""
    n_axes = min(len(image.shape), 3)
    pixdim = _stored_pixdim(path, image)
    for axis in range(1, n_axes + 1) if pixdim is not None else ():
        value = float(pixdim[axis])
        if not (math.isfinite(value) and value > 0):
            raise InputError(path, f"header field pixdim[{axis}] = {value}: voxel size must be positive and finite")
    affine = np.asarray(image.affine, dtype=np.float64)
    field = _affine_field(image)
    if not np.all(np.isfinite(affine)):
        raise InputError(path, f"affine from header field {field} has non-finite values")
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if n_axes == 3 and abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(lengths)):
        raise InputError(
            path, f"affine from header field {field} is degenerate: voxel axis lengths {lengths.tolist()}"
        )


def _affine_field(image: SpatialImage) -> str:
    """The header field nibabel took the affine from: sform (srow_x/y/z), qform (quatern_*) or pixdim."""
    header = image.header
    if "sform_code" in header and int(header["sform_code"]) > 0:
        return "sform (srow_x/srow_y/srow_z)"
    if "qform_code" in header and int(header["qform_code"]) > 0:
        return "qform (quatern_b/c/d, qoffset_x/y/z)"
    return "pixdim"


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Whole array (real dtype) and affine of a NIfTI file; bad files raise InputError naming the file and field."""
    _check_present(path)
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel, gzip and zlib raise many different types for corrupt files
        raise InputError(path, f"unreadable or truncated NIfTI ({type(error).__name__}: {error})") from error
    _check_voxel_type(path, image)
    _check_voxel_size(path, image)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
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
    """Load frames (float32 images or uint8 remapped labels) and their affine, reading each file once.

    Every file must share the first file's affine (within AFFINE_RTOL / AFFINE_ATOL mm), else InputError.
    """
    cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    frames: list[np.ndarray] = []
    for ref in refs:
        if ref.path not in cache:
            cache[ref.path] = _read_file(ref.path)
        data, affine = cache[ref.path]
        frame = _select_frame(data, ref)
        frames.append(_as_label(frame, ref) if is_label else _as_image(frame, ref))
    affines = [(path, affine) for path, (_, affine) in cache.items()]
    for path, affine in affines[1:]:
        check_same_geometry(path, affine, affines[0][0], affines[0][1])
    return frames, affines[0][1] if affines else np.eye(4)


def check_same_geometry(path: Path, affine: np.ndarray, reference_path: Path, reference: np.ndarray) -> None:
    """Raise InputError when `path`'s affine differs from `reference_path`'s (ED/ES or label/image mismatch)."""
    if not np.allclose(affine, reference, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        raise InputError(
            path,
            f"affine (voxel-to-world geometry) differs from that of {reference_path}: "
            f"{np.round(affine, 4).tolist()} vs {np.round(reference, 4).tolist()}",
        )


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
