"""Per-vendor acquisition/appearance profiles, dataset shares and class mixes of the synthetic cohort, and both at a
heterogeneity h (0 = every vendor looks like Siemens with the pooled class mix, 1 = the real ones, 1.5 = beyond).

Numbers follow reference-data.md §2, §3, §6: real per-centre / per-vendor counts for the class mixes; §6 ranges for
spacing, SNR, bias, contrast and sharpness. Matrix sizes and frame counts are taken from the low end of the real
ranges so that generation stays fast (documented in docs/synthetic-cohort.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace

from data_prep.records import KNOWN_CODES


@dataclass(frozen=True, kw_only=True)
class VendorProfile:
    """Acquisition and appearance of one scanner vendor (ranges are sampled uniformly per subject)."""

    name: str
    spacing_mm: tuple[float, float]
    matrix: tuple[int, int]
    matrix_aspect: tuple[float, float] = (1.0, 1.0)
    snr: tuple[float, float]
    bias_amplitude: float
    blood_to_myocardium: tuple[float, float]
    edge_mm: tuple[float, float]
    max_value: tuple[float, float]
    float_fraction: float = 0.0
    field_3t_fraction: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    """Exponent of a gamma curve on the reconstructed magnitude (1 = none)."""
    blur_mm: tuple[float, float] = (0.0, 0.0)
    """Full width at half maximum (mm) of an in-plane Gaussian reconstruction blur (0 = none)."""


PROFILES: dict[str, VendorProfile] = {
    profile.name: profile
    for profile in (
        VendorProfile(
            name="siemens",
            spacing_mm=(1.30, 1.90),
            matrix=(154, 200),
            matrix_aspect=(1.0, 1.19),
            snr=(20.0, 40.0),
            bias_amplitude=0.20,
            blood_to_myocardium=(3.0, 4.0),
            edge_mm=(0.4, 0.7),
            max_value=(500.0, 1500.0),
            field_3t_fraction=0.4,
        ),
        VendorProfile(
            name="philips",
            spacing_mm=(1.15, 1.35),
            matrix=(192, 208),
            snr=(15.0, 30.0),
            bias_amplitude=0.30,
            blood_to_myocardium=(2.5, 3.5),
            edge_mm=(1.0, 1.4),
            max_value=(1000.0, 4000.0),
            blur_mm=(3.0, 3.5),
        ),
        VendorProfile(
            name="ge",
            spacing_mm=(1.30, 1.45),
            matrix=(176, 200),
            snr=(10.0, 25.0),
            bias_amplitude=0.40,
            blood_to_myocardium=(2.0, 3.0),
            edge_mm=(1.4, 2.2),
            max_value=(200.0, 800.0),
            float_fraction=0.5,
            blur_mm=(3.5, 4.5),
        ),
        VendorProfile(
            name="canon",
            spacing_mm=(1.05, 1.30),
            matrix=(192, 208),
            snr=(15.0, 30.0),
            bias_amplitude=0.25,
            blood_to_myocardium=(2.5, 3.5),
            edge_mm=(0.7, 1.0),
            max_value=(800.0, 2500.0),
            gamma=(0.8, 0.9),
        ),
    )
}

# Share of each vendor's subjects per dataset (open-data sizes: ACDC 150, M&Ms-1 A 95 / B 125 / C 75 / D 50,
# M&Ms-2 per vendor estimated 164 / 130 / 66 from the known NOR and HCM counts).
DATASET_SHARES: dict[str, dict[str, float]] = {
    "siemens": {"acdc": 150 / 409, "mnms": 95 / 409, "mnms2": 164 / 409},
    "philips": {"mnms": 125 / 255, "mnms2": 130 / 255},
    "ge": {"mnms": 75 / 141, "mnms2": 66 / 141},
    "canon": {"mnms": 1.0},
}

# Class mixes (counts) per vendor and dataset. ACDC: 30 per group. M&Ms-1: the challenge's per-centre table (B = C2 +
# C3). M&Ms-2: NOR and HCM per vendor are known; the other 225 cases (LV 60, ARR 35, FALL 35, CIA 35, TRI 30, RV 30)
# are spread over vendors 50 / 30 / 20 % (assumption).
_MNMS2_OTHERS = {"LV": 60, "ARR": 35, "FALL": 35, "CIA": 35, "TRI": 30, "RV": 30}
CLASS_MIX: dict[tuple[str, str], dict[str, float]] = {
    ("siemens", "acdc"): {"NOR": 30, "DCM": 30, "HCM": 30, "MINF": 30, "RV": 30},
    ("siemens", "mnms"): {"NOR": 22, "HCM": 25, "DCM": 37, "ARV": 12},
    ("philips", "mnms"): {"NOR": 65, "HCM": 51, "DCM": 5, "HHD": 4},
    ("ge", "mnms"): {"NOR": 21, "HCM": 8, "HHD": 19, "ARV": 2, "AHS": 3, "IHD": 4, "LV": 2, "Other": 18},
    ("canon", "mnms"): {"NOR": 14, "HCM": 15, "DCM": 9, "HHD": 1, "ARV": 1, "IHD": 1, "LV": 2, "Other": 7},
    ("siemens", "mnms2"): {"NOR": 22, "HCM": 30, **{k: v * 0.5 for k, v in _MNMS2_OTHERS.items()}},
    ("philips", "mnms2"): {"NOR": 35, "HCM": 27, **{k: v * 0.3 for k, v in _MNMS2_OTHERS.items()}},
    ("ge", "mnms2"): {"NOR": 18, "HCM": 3, **{k: v * 0.2 for k, v in _MNMS2_OTHERS.items()}},
}

# M&Ms-1 folders per vendor (open release: Training/Labeled, Training/Unlabeled, Validation, Testing counts).
MNMS_FOLDERS: dict[str, dict[str, int]] = {
    "siemens": {"Training/Labeled": 75, "Validation": 4, "Testing": 16},
    "philips": {"Training/Labeled": 75, "Validation": 10, "Testing": 40},
    "ge": {"Training/Unlabeled": 25, "Validation": 10, "Testing": 40},
    "canon": {"Validation": 10, "Testing": 40},
}
MNMS_TRAINING_CODES = frozenset({"NOR", "HCM", "DCM", "HHD", "ARV"})
MNMS_VENDOR_FIELDS = {
    "siemens": ("Siemens", "A", ("1",)),
    "philips": ("Philips", "B", ("2", "3")),
    "ge": ("GE", "C", ("4",)),
    "canon": ("Canon", "D", ("5",)),
}
MNMS2_VENDOR_FIELDS = {
    "siemens": ("SIEMENS", ("Symphony", "SymphonyTim", "Avanto", "Avanto Fit", "TrioTim")),
    "philips": ("Philips Medical Systems", ("Achieva",)),
    "ge": ("GE MEDICAL SYSTEMS", ("SIGNA EXCITE", "Signa Explorer", "Signa HDxt")),
}
MNMS2_TEST_ONLY_CODES = frozenset({"TRI", "RV"})


REFERENCE_VENDOR = "siemens"
"""The vendor every other vendor's profile moves to at heterogeneity 0."""
HETEROGENEITY_RANGE = (0.0, 1.5)
PROFILE_BOUNDS: dict[str, tuple[float, float]] = {
    "spacing_mm": (0.8, 2.5),
    "matrix": (128, 256),
    "matrix_aspect": (1.0, 1.3),
    "snr": (5.0, 60.0),
    "bias_amplitude": (0.0, 0.6),
    "blood_to_myocardium": (1.5, 5.0),
    "edge_mm": (0.2, 3.0),
    "max_value": (100.0, 6000.0),
    "float_fraction": (0.0, 1.0),
    "field_3t_fraction": (0.0, 1.0),
    "gamma": (0.5, 2.0),
    "blur_mm": (0.0, 8.0),
}
"""Sane bounds every interpolated profile value is clipped to (they hold every real profile, so h <= 1 is never
clipped; above 1 they keep SNR, contrast and sizes physical and the gamma curve mild)."""


def check_heterogeneity(heterogeneity: float) -> float:
    """`heterogeneity` as a float, or ValueError naming the option when it lies outside HETEROGENEITY_RANGE."""
    low, high = HETEROGENEITY_RANGE
    if not low <= heterogeneity <= high:
        raise ValueError(f"--heterogeneity {heterogeneity}: must lie in [{low}, {high}]")
    return float(heterogeneity)


def _between(reference: float, own: float, heterogeneity: float, name: str) -> float:
    """(1 - h) * reference + h * own (exactly `own` at h = 1, `reference` at h = 0), clipped to the field's bounds."""
    low, high = PROFILE_BOUNDS[name]
    return min(max((1 - heterogeneity) * reference + heterogeneity * own, low), high)


def profile_at(vendor: str, heterogeneity: float) -> VendorProfile:
    """`vendor`'s profile at a heterogeneity: every numeric field interpolated between the reference vendor's (h = 0)
    and its own (h = 1), extrapolated above 1 and clipped to PROFILE_BOUNDS; ranges stay ordered, matrices integer."""
    check_heterogeneity(heterogeneity)
    if vendor not in PROFILES:
        raise ValueError(f"vendor {vendor!r} has no profile; choose one of {', '.join(PROFILES)}")
    reference, own = PROFILES[REFERENCE_VENDOR], PROFILES[vendor]
    values: dict[str, object] = {}
    for field in fields(VendorProfile):
        if field.name == "name":
            continue
        ours, theirs = getattr(own, field.name), getattr(reference, field.name)
        if isinstance(ours, tuple):
            pair = sorted(_between(r, o, heterogeneity, field.name) for r, o in zip(theirs, ours, strict=True))
            values[field.name] = tuple(round(v) for v in pair) if field.name == "matrix" else tuple(pair)
        else:
            values[field.name] = _between(theirs, ours, heterogeneity, field.name)
    return replace(own, **values)


def _pooled_mix() -> dict[str, dict[str, float]]:
    """Per dataset, the pooled class distribution: the healthy share of all real counts together (CLASS_MIX summed
    over vendors and datasets), and the diseased share spread over the dataset's disease codes in proportion to
    their pooled counts (codes the dataset's layout does not accept are left out)."""
    pooled: Counter[str] = Counter()
    for mix in CLASS_MIX.values():
        pooled.update(mix)
    healthy = pooled["NOR"] / sum(pooled.values())
    mixes = {}
    for dataset, codes in KNOWN_CODES.items():
        diseased = {code: pooled[code] for code in sorted(codes - {"NOR"}) if pooled[code] > 0}
        total = sum(diseased.values())
        mixes[dataset] = {"NOR": healthy, **{code: (1 - healthy) * n / total for code, n in diseased.items()}}
    return mixes


POOLED_MIX: dict[str, dict[str, float]] = _pooled_mix()
"""Class shares per dataset at heterogeneity 0 (the same healthy share, 26.5 %, at every site and dataset)."""


def class_mix_at(vendor: str, dataset: str, heterogeneity: float) -> dict[str, float]:
    """Class weights of (vendor, dataset) at a heterogeneity: (1 - h) x the pooled mix + h x the real counts (in the
    real counts' scale, so h = 1 gives CLASS_MIX exactly, keys in the same order); codes of weight <= 0 dropped."""
    check_heterogeneity(heterogeneity)
    real = CLASS_MIX[vendor, dataset]
    total = sum(real.values())
    pooled = POOLED_MIX[dataset]
    codes = [*real, *(code for code in pooled if code not in real)]
    weights = {
        code: (1 - heterogeneity) * pooled.get(code, 0.0) * total + heterogeneity * real.get(code, 0.0)
        for code in codes
    }
    return {code: weight for code, weight in weights.items() if weight > 0}


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to `weights` (ties broken by key order)."""
    weight_sum = sum(weights.values())
    exact = {key: total * value / weight_sum for key, value in weights.items()}
    counts = {key: int(value) for key, value in exact.items()}
    order = sorted(weights, key=lambda key: (-(exact[key] - counts[key]), list(weights).index(key)))
    for key in order[: total - sum(counts.values())]:
        counts[key] += 1
    return counts
