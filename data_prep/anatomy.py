"""Vendor-independent heart anatomy and motion per pathology, with overlapping distributions (severity mixing).

A subject's parameters are a healthy sample plus `severity × (pathology shift)`, severity ~ U(0.35, 1): mild cases look
almost normal, so the healthy/diseased task is not separable by one feature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SEVERITY_RANGE = (0.35, 1.0)


@dataclass(frozen=True)
class HeartParams:
    """ED geometry (mm), function (fractions) and regional abnormality (radians) of one heart."""

    lv_radius: float
    lv_length: float
    wall: float
    septal_thickening: float
    lv_ef: float
    akinetic_halfwidth: float
    infarct_thinning: float
    infarct_angle: float
    rv_scale: float
    rv_ef: float
    rv_wall: float


HEALTHY_MEAN = HeartParams(
    lv_radius=25.0,
    lv_length=85.0,
    wall=8.5,
    septal_thickening=0.0,
    lv_ef=0.62,
    akinetic_halfwidth=0.0,
    infarct_thinning=0.0,
    infarct_angle=0.0,
    rv_scale=1.0,
    rv_ef=0.55,
    rv_wall=3.0,
)
HEALTHY_SD = {"lv_radius": 2.2, "lv_length": 6.0, "wall": 1.0, "lv_ef": 0.05, "rv_scale": 0.07, "rv_ef": 0.05}

# Full-severity shifts from the healthy mean (reference-data.md §1, §6 rules of thumb).
SHIFTS: dict[str, dict[str, float]] = {
    "NOR": {},
    "DCM": {"lv_radius": 8.0, "lv_length": 12.0, "wall": -2.0, "lv_ef": -0.34, "rv_scale": 0.05},
    "HCM": {"lv_radius": -3.0, "wall": 7.0, "septal_thickening": 0.35, "lv_ef": 0.08},
    "MINF": {"lv_radius": 4.0, "lv_ef": -0.27, "akinetic_halfwidth": 0.9, "infarct_thinning": 0.5},
    "IHD": {"lv_radius": 2.0, "lv_ef": -0.18, "akinetic_halfwidth": 0.6, "infarct_thinning": 0.3},
    "HHD": {"lv_radius": -1.0, "wall": 3.0},
    "AHS": {"lv_radius": 3.0, "wall": 1.5, "lv_ef": -0.03, "rv_scale": 0.15},
    "LV": {"lv_radius": 5.0, "lv_length": 6.0, "wall": -1.0, "lv_ef": -0.15},
    "RV": {"rv_scale": 0.40, "rv_ef": -0.15},
    "ARV": {"rv_scale": 0.35, "rv_ef": -0.20},
    "ARR": {"rv_scale": 0.30, "rv_ef": -0.15},
    "FALL": {"lv_radius": -2.0, "rv_scale": 0.30, "rv_ef": -0.10, "rv_wall": 2.5},
    "CIA": {"rv_scale": 0.30},
    "TRI": {"rv_scale": 0.35, "rv_ef": -0.05},
}
OTHER_SOURCES = ("DCM", "HCM", "MINF", "HHD", "LV", "ARV")
LIMITS = {"lv_ef": (0.12, 0.85), "rv_ef": (0.15, 0.75), "wall": (3.5, 26.0), "lv_radius": (15.0, 42.0)}


def sample_heart(pathology: str, rng: np.random.Generator) -> HeartParams:
    """Sample the anatomy of one subject with the given pathology code."""
    values = {name: getattr(HEALTHY_MEAN, name) for name in HeartParams.__dataclass_fields__}
    for name, sd in HEALTHY_SD.items():
        values[name] += rng.normal(0.0, sd)
    if pathology == "Other":
        source, severity = OTHER_SOURCES[rng.integers(len(OTHER_SOURCES))], rng.uniform(0.2, 0.6)
    else:
        source, severity = pathology, (rng.uniform(*SEVERITY_RANGE) if pathology != "NOR" else 0.0)
    for name, shift in SHIFTS[source].items():
        values[name] += severity * shift
    values["infarct_angle"] = rng.uniform(0.0, 2.0 * np.pi)
    body_scale = rng.normal(1.0, 0.06)
    for name in ("lv_radius", "lv_length"):
        values[name] *= body_scale
    for name, (low, high) in LIMITS.items():
        values[name] = float(np.clip(values[name], low, high))
    return replace(HEALTHY_MEAN, **{name: float(value) for name, value in values.items()})
