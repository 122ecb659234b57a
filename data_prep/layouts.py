"""Writers of the three raw on-disk layouts (ACDC, M&Ms-1, M&Ms-2) with their file names, metadata and quirks."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from data_prep.nifti import save_atomic
from data_prep.phantom import Acquisition, Cine
from data_prep.records import ACDC_LABEL_MAP, MNMS_LABEL_MAP
from models.atomic_io import write_text_atomic

INT16_MAX = 32767


@dataclass(frozen=True)
class Appearance:
    """How a scanner stores intensities: dtype and the scale from relative signal (blood ≈ 1) to stored values."""

    dtype: type
    scale: float


def stored_values(signal: np.ndarray, appearance: Appearance) -> np.ndarray:
    """Signal in the vendor's dtype and range (uncalibrated, like the real files)."""
    scaled = signal * np.float32(appearance.scale)
    if appearance.dtype is np.float32:
        return scaled
    return np.clip(np.rint(scaled), 0, INT16_MAX).astype(np.int16)


def _to_dataset_labels(labels: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Unified labels (RV 1, MYO 2, LV 3) → a dataset's own label numbers."""
    lookup = np.zeros(4, dtype=np.uint8)
    for dataset_value, unified in label_map.items():
        lookup[unified] = dataset_value
    return lookup[labels]


def axis_aligned_affine(acq: Acquisition) -> np.ndarray:
    """ACDC-style affine: axis-aligned, only the spacing is meaningful."""
    return np.diag([-acq.spacing[0], -acq.spacing[1], acq.slice_step, 1.0])


def oblique_affine(acq: Acquisition, rng: np.random.Generator, shear: float = 0.0) -> np.ndarray:
    """Double-oblique short-axis affine; `shear` > 0 makes the direction cosines non-orthonormal (M&Ms-1 quirk)."""
    angles = [rng.uniform(-70, -40), rng.uniform(20, 50), rng.uniform(-30, 30)]
    directions = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    directions[:, 1] += shear * directions[:, 0]
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag([acq.spacing[0], acq.spacing[1], acq.slice_step])
    affine[:3, 3] = rng.uniform(-120, 120, size=3)
    return affine


def four_chamber_affine(sax_affine: np.ndarray, acq: Acquisition, spacing: float, top_c: float) -> np.ndarray:
    """Affine of the 4-chamber plane consistent with the SAX stack (u → image x, long axis → image y)."""
    directions = sax_affine[:3, :3] / np.linalg.norm(sax_affine[:3, :3], axis=0)
    cos, sin = np.cos(acq.heart_angle), np.sin(acq.heart_angle)
    u_axis = directions[:, 0] * cos + directions[:, 1] * sin
    v_axis = -directions[:, 0] * sin + directions[:, 1] * cos
    c_axis = -directions[:, 2]
    centre_voxel = [
        (acq.matrix[0] - 1) / 2 + acq.heart_offset_mm[0] / acq.spacing[0],
        (acq.matrix[1] - 1) / 2 + acq.heart_offset_mm[1] / acq.spacing[1],
        acq.first_slice_c / acq.slice_step,
        1.0,
    ]
    heart_centre = (sax_affine @ centre_voxel)[:3]
    affine = np.eye(4)
    affine[:3, 0] = u_axis * spacing
    affine[:3, 1] = -c_axis * spacing
    affine[:3, 2] = v_axis * 8.0
    affine[:3, 3] = heart_centre - u_axis * spacing * (acq.matrix[0] - 1) / 2 + c_axis * top_c
    return affine


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file (temporary name, then rename) keeping the data's dtype."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    save_atomic(image, path)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Write a CSV (temporary name, then rename)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_acdc(
    folder: Path,
    pid: str,
    cine: Cine,
    acq: Acquisition,
    appearance: Appearance,
    affine: np.ndarray,
    info: dict[str, str],
) -> None:
    """`patientNNN/`: Info.cfg (1-based frames), `_4d`, `_frameYY` and `_frameYY_gt` (1 RV, 2 MYO, 3 LV)."""
    stored = stored_values(cine.signal, appearance)
    save(stored, affine, folder / f"{pid}_4d.nii.gz")
    for frame in (acq.ed, acq.es):
        save(np.asfortranarray(stored[..., frame]), affine, folder / f"{pid}_frame{frame + 1:02d}.nii.gz")
        labels = _to_dataset_labels(cine.labels[frame], ACDC_LABEL_MAP)
        save(labels, affine, folder / f"{pid}_frame{frame + 1:02d}_gt.nii.gz")
    fields = {"ED": str(acq.ed + 1), "ES": str(acq.es + 1), **info, "NbFrame": str(acq.n_frames)}
    (folder / "Info.cfg").write_text("".join(f"{key}: {fields[key]}\n" for key in sorted(fields)), encoding="utf-8")
    (folder / "MANDATORY_CITATION.md").write_text("Synthetic phantom: no citation needed.\n", encoding="utf-8")


def write_mnms(
    folder: Path,
    code: str,
    cine: Cine,
    acq: Acquisition,
    appearance: Appearance,
    affine: np.ndarray,
    annotated: bool,
) -> None:
    """`<CODE>/`: 4D `_sa` and 4D `_sa_gt` labelled only at ED and ES (1 LV, 2 MYO, 3 RV); empty when unannotated."""
    save(stored_values(cine.signal, appearance), affine, folder / f"{code}_sa.nii.gz")
    gt = np.zeros(cine.signal.shape, dtype=np.uint8, order="F")
    if annotated:
        for frame in (acq.ed, acq.es):
            gt[..., frame] = _to_dataset_labels(cine.labels[frame], MNMS_LABEL_MAP)
    save(gt, affine, folder / f"{code}_sa_gt.nii.gz")


def write_mnms2(
    folder: Path,
    pid: str,
    sax: Cine,
    lax: Cine,
    acq: Acquisition,
    appearance: Appearance,
    sax_affine: np.ndarray,
    lax_affine: np.ndarray,
) -> None:
    """`NNN/`: `SA_CINE` (4D), `SA_ED/ES[_gt]`, `LA_CINE` (x, y, 1, t), `LA_ED/ES[_gt]` (1 LV, 2 MYO, 3 RV)."""
    for view, cine, affine in (("SA", sax, sax_affine), ("LA", lax, lax_affine)):
        stored = stored_values(cine.signal, appearance)
        save(stored, affine, folder / f"{pid}_{view}_CINE.nii.gz")
        for phase, frame in (("ED", acq.ed), ("ES", acq.es)):
            save(np.asfortranarray(stored[..., frame]), affine, folder / f"{pid}_{view}_{phase}.nii.gz")
            labels = _to_dataset_labels(cine.labels[frame], MNMS_LABEL_MAP)
            save(labels, affine, folder / f"{pid}_{view}_{phase}_gt.nii.gz")
