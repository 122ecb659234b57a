"""Image-derived cardiac phenotypes from the ED and ES label maps (volumes, ejection fractions, myocardium, wall).

These are the measurements UK Biobank publishes for its cine MRI (LV/RV volumes at ED and ES, ejection fractions,
myocardial volume, wall thickness). They are computed from the segmentations of a subject, never from the generator's
parameters, so the same code serves a real labelled cohort. Slices are the label map's third axis (short axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from data_prep.nifti import read_frames
from data_prep.preprocess import voxel_spacing
from data_prep.records import LV_LABEL, MYO_LABEL, RV_LABEL, InputError, SubjectRecord

PHENOTYPES = (
    "lv_edv_ml",
    "lv_esv_ml",
    "lv_sv_ml",
    "lv_ef",
    "rv_edv_ml",
    "rv_esv_ml",
    "rv_sv_ml",
    "rv_ef",
    "myo_ed_ml",
    "myo_es_ml",
    "wall_mean_ed_mm",
    "wall_max_ed_mm",
    "wall_mean_es_mm",
    "lv_length_ed_mm",
    "rv_to_lv_edv",
)
"""The phenotype columns, in the order of a target vector."""


def _volume_ml(mask: np.ndarray, voxel_mm3: float) -> float:
    return float(mask.sum()) * voxel_mm3 / 1000.0


def _wall_thickness_mm(label: np.ndarray, pixel_mm2: float) -> tuple[float, float]:
    """Mean and max over slices of the annulus thickness sqrt((LV + MYO)/pi) - sqrt(LV/pi) (0, 0 without a wall)."""
    thickness = []
    for z in range(label.shape[2]):
        cavity = float((label[..., z] == LV_LABEL).sum()) * pixel_mm2
        wall = float((label[..., z] == MYO_LABEL).sum()) * pixel_mm2
        if cavity > 0 and wall > 0:
            thickness.append(math.sqrt((cavity + wall) / math.pi) - math.sqrt(cavity / math.pi))
    return (float(np.mean(thickness)), float(np.max(thickness))) if thickness else (0.0, 0.0)


def _ejection_fraction(edv: float, esv: float) -> float:
    return (edv - esv) / edv if edv > 0 else 0.0


def phenotypes(ed: np.ndarray, es: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Every PHENOTYPES value from ED and ES label maps (RV 1, MYO 2, LV 3) with voxel `spacing` (mm)."""
    sx, sy, sz = (float(s) for s in spacing)
    voxel, pixel = sx * sy * sz, sx * sy
    lv_edv, lv_esv = _volume_ml(ed == LV_LABEL, voxel), _volume_ml(es == LV_LABEL, voxel)
    rv_edv, rv_esv = _volume_ml(ed == RV_LABEL, voxel), _volume_ml(es == RV_LABEL, voxel)
    wall_mean_ed, wall_max_ed = _wall_thickness_mm(ed, pixel)
    heart_slices = np.flatnonzero(np.isin(ed, (LV_LABEL, MYO_LABEL)).any(axis=(0, 1)))
    return {
        "lv_edv_ml": lv_edv,
        "lv_esv_ml": lv_esv,
        "lv_sv_ml": lv_edv - lv_esv,
        "lv_ef": _ejection_fraction(lv_edv, lv_esv),
        "rv_edv_ml": rv_edv,
        "rv_esv_ml": rv_esv,
        "rv_sv_ml": rv_edv - rv_esv,
        "rv_ef": _ejection_fraction(rv_edv, rv_esv),
        "myo_ed_ml": _volume_ml(ed == MYO_LABEL, voxel),
        "myo_es_ml": _volume_ml(es == MYO_LABEL, voxel),
        "wall_mean_ed_mm": wall_mean_ed,
        "wall_max_ed_mm": wall_max_ed,
        "wall_mean_es_mm": _wall_thickness_mm(es, pixel)[0],
        "lv_length_ed_mm": len(heart_slices) * sz,
        "rv_to_lv_edv": rv_edv / lv_edv if lv_edv > 0 else 0.0,
    }


def subject_phenotypes(record: SubjectRecord) -> dict[str, float]:
    """The phenotypes of one labelled subject; a subject without both label maps, or without an LV, is refused."""
    if record.ed_label is None or record.es_label is None:
        raise InputError(record.source, f"subject {record.subject_id}: phenotypes need both the ED and ES label maps")
    (ed, es), affine = read_frames([record.ed_label, record.es_label], is_label=True)
    if ed.shape != es.shape:
        raise InputError(record.es_label.path, f"ES label shape {es.shape} differs from ED label shape {ed.shape}")
    if not (ed == LV_LABEL).any():
        raise InputError(record.ed_label.path, f"subject {record.subject_id}: the ED label map has no LV cavity")
    return phenotypes(ed, es, voxel_spacing(affine))
