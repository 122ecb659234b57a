"""Analytic beating-heart phantom: LV, myocardium and RV in a chest, rendered as SAX / 4-chamber cine with masks.

Heart frame (mm): u points from the RV towards the LV in the short-axis plane, v completes it, c runs along the long
axis (base plane c = 0, apex at c = -L). The LV cavity and epicardium are truncated half-ellipsoids whose radius varies
with the angle around the axis (septal thickening, akinetic infarct sector); the RV is a truncated ellipsoid wrapped
around the septum. Contraction follows a smooth cycle between ED (phase 0) and ES (phase 1): the cavity shrinks to
(1 - EF) of its volume, the myocardium keeps its area, the long axis shortens. Partial volume comes from a sigmoid of
the approximate signed distance with the vendor's edge width; labels are the hard inside tests. The vendor's
reconstruction (an in-plane blur, then a gamma curve) acts on the noisy magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from data_prep.anatomy import HeartParams
from data_prep.records import LV_LABEL, MYO_LABEL, RV_LABEL
from data_prep.vendors import VendorProfile

BLOOD, BODY, FAT, LUNG, EPICARDIAL_FAT = 1.0, 0.40, 0.75, 0.04, 0.70
EPICARDIAL_FAT_MM = 3.0
HEART_BOX_MM = 80.0
SEPTUM_ANGLE = np.pi
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class Acquisition:
    """Geometry and appearance of one cine acquisition (voxel axes x, y in-plane, z slices from base to apex)."""

    matrix: tuple[int, int]
    spacing: tuple[float, float]
    slice_step: float
    n_slices: int
    n_frames: int
    ed: int
    es: int
    heart_offset_mm: tuple[float, float]
    heart_angle: float
    first_slice_c: float
    snr: float
    blood_to_myocardium: float
    edge_mm: float
    bias: tuple[float, ...]
    banding: tuple[float, float, float] | None
    gamma: float
    blur_mm: float


def sample_acquisition(
    profile: VendorProfile,
    heart: HeartParams,
    rng: np.random.Generator,
    slice_step: float,
    frames: tuple[int, int],
    field_3t: bool,
    base_angle: float,
    aux: np.random.Generator,
) -> Acquisition:
    """Draw an acquisition for `heart` on a scanner of `profile` (slices cover base to apex plus margins).

    The reconstruction factors added later (gamma, blur) come from `aux`, so that `rng` is consumed exactly as before
    they existed and every earlier factor (and the noise) is unchanged.
    """
    spacing = float(rng.uniform(*profile.spacing_mm))
    side = int(rng.integers(profile.matrix[0], profile.matrix[1] + 1))
    matrix = (side, round(side * rng.uniform(*profile.matrix_aspect)))
    fov = side * spacing
    first_slice_c = float(rng.uniform(0.2, 1.0) * slice_step)
    coverage = first_slice_c + heart.lv_length + 0.8 * heart.wall + rng.uniform(0.0, 1.0) * slice_step
    n_slices = int(np.ceil(coverage / slice_step))
    n_frames = int(rng.integers(frames[0], frames[1] + 1))
    ed = 0 if rng.random() < 0.8 else int(rng.integers(n_frames))
    es = (ed + round(n_frames * rng.uniform(0.30, 0.40))) % n_frames
    snr = float(rng.uniform(*profile.snr)) * (1.4 if field_3t else 1.0)
    bias = tuple(float(b) for b in rng.uniform(-1.0, 1.0, size=6) * profile.bias_amplitude)
    banding = None
    if field_3t and rng.random() < 0.5:
        banding = (float(rng.uniform(0, np.pi)), float(rng.uniform(-0.3, 0.3) * fov), float(rng.uniform(2.0, 4.0)))
    return Acquisition(
        matrix=matrix,
        spacing=(spacing, spacing),
        slice_step=slice_step,
        n_slices=n_slices,
        n_frames=n_frames,
        ed=ed,
        es=es,
        heart_offset_mm=(float(rng.uniform(-15, 15)), float(rng.uniform(-15, 15))),
        heart_angle=base_angle + float(rng.normal(0.0, 0.25)),
        first_slice_c=first_slice_c,
        snr=snr,
        blood_to_myocardium=float(rng.uniform(*profile.blood_to_myocardium)),
        edge_mm=float(rng.uniform(*profile.edge_mm)),
        bias=bias,
        banding=banding,
        gamma=float(aux.uniform(*profile.gamma)),
        blur_mm=float(aux.uniform(*profile.blur_mm)),
    )


def contraction_phase(n_frames: int, ed: int, es: int) -> np.ndarray:
    """Phase per frame: 0 at ED, 1 at ES, smooth (cosine) systole and diastole around the cycle."""
    systole = (es - ed) % n_frames
    phases = np.empty(n_frames)
    for frame in range(n_frames):
        step = (frame - ed) % n_frames
        if step <= systole:
            phases[frame] = 0.5 * (1 - np.cos(np.pi * step / systole))
        else:
            phases[frame] = 0.5 * (1 + np.cos(np.pi * (step - systole) / (n_frames - systole)))
    return phases


def _soft(distance: np.ndarray, edge_mm: float) -> np.ndarray:
    """Partial-volume membership from a signed distance in mm (positive inside): a linear ramp `edge_mm` wide."""
    return np.clip(distance * (0.5 / edge_mm) + 0.5, 0.0, 1.0)


def _truncated_ellipsoid_distance(radial: np.ndarray, c: np.ndarray, radius: np.ndarray, length: float) -> np.ndarray:
    """Approximate signed distance to a half-ellipsoid (base c = 0, apex c = -length); `radial` = normalised radius."""
    profile = np.sqrt(np.clip(1.0 - (np.minimum(c, 0.0) / length) ** 2, 0.0, 1.0))
    distance = radius * (profile - radial) - np.maximum(0.0, -length - c)
    return np.minimum(distance, -c)


class HeartModel:
    """Signed distances of the LV cavity, epicardium and RV at any contraction phase, on a fixed (u, v, c) grid."""

    def __init__(self, heart: HeartParams, u: np.ndarray, v: np.ndarray, c: np.ndarray) -> None:
        self.heart, self.u, self.v, self.c = heart, u, v, c
        self.r = np.hypot(u, v)
        theta = np.arctan2(v, u)
        septal = np.maximum(0.0, np.cos(theta - SEPTUM_ANGLE)) ** 2
        offset = np.abs(np.angle(np.exp(1j * (theta - heart.infarct_angle))))
        self.akinetic = np.clip((heart.akinetic_halfwidth - offset) / 0.25 + 0.5, 0.0, 1.0)
        if heart.akinetic_halfwidth <= 0:
            self.akinetic = np.zeros_like(theta)
        self.wall = heart.wall * (1 + heart.septal_thickening * septal) * (1 - heart.infarct_thinning * self.akinetic)
        self.shortening = float(np.clip(0.12 * heart.lv_ef / 0.62, 0.03, 0.16))

    def distances(self, phase: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(LV cavity, LV epicardium, RV cavity) signed distances in mm at `phase`."""
        h = self.heart
        length = h.lv_length * (1 - self.shortening * phase)
        global_radius = h.lv_radius * np.sqrt((1 - h.lv_ef * phase) / (length / h.lv_length))
        radius = h.lv_radius + (1 - self.akinetic) * (global_radius - h.lv_radius)
        epi_radius = np.sqrt(radius**2 + (h.lv_radius + self.wall) ** 2 - h.lv_radius**2)
        endo = _truncated_ellipsoid_distance(self.r / radius, self.c, radius, length)
        epi = _truncated_ellipsoid_distance(self.r / epi_radius, self.c, epi_radius, length + 0.8 * h.wall)
        outer = h.lv_radius + h.wall
        rv_shrink = np.sqrt(1 - h.rv_ef * phase)
        centre = -outer * (0.55 + 0.25 * (h.rv_scale - 1))
        semi_u, semi_v = outer * 0.75 * h.rv_scale * rv_shrink, outer * 1.15 * h.rv_scale * rv_shrink
        radial = np.hypot((self.u - centre) / semi_u, self.v / semi_v)
        rv = _truncated_ellipsoid_distance(radial, self.c, np.asarray(min(semi_u, semi_v)), 0.8 * length)
        return endo, epi, rv


def _compose(
    background: np.ndarray, model: HeartModel, phase: float, acq: Acquisition, atria: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signal and hard label map of the heart region at one phase."""
    endo, epi, rv = model.distances(phase)
    myo = 1.0 / acq.blood_to_myocardium
    edge = acq.edge_mm
    outside_epi = 1 - _soft(epi, edge)
    rv_wall = _soft(rv + model.heart.rv_wall, edge) * (1 - _soft(rv, edge)) * outside_epi
    rv_blood = _soft(rv, edge) * (1 - _soft(epi + 0.5, edge))
    envelope = np.maximum(
        _soft(epi + EPICARDIAL_FAT_MM, edge), _soft(rv + model.heart.rv_wall + EPICARDIAL_FAT_MM, edge)
    )
    signal = background * (1 - envelope) + EPICARDIAL_FAT * envelope
    signal = signal * (1 - atria) + BLOOD * atria
    signal = signal * (1 - rv_wall) + myo * rv_wall
    signal = signal * outside_epi + myo * (1 - outside_epi)
    lv_blood = _soft(endo, edge)
    signal = signal * (1 - lv_blood) + BLOOD * lv_blood
    signal = signal * (1 - rv_blood) + BLOOD * rv_blood
    labels = np.zeros(endo.shape, dtype=np.uint8)
    labels[(rv > 0) & (epi <= -0.5)] = RV_LABEL
    labels[epi > 0] = MYO_LABEL
    labels[endo > 0] = LV_LABEL
    return signal.astype(np.float32), labels


def _atria(model: HeartModel, edge_mm: float) -> np.ndarray:
    """Blood of the atria above the base plane (unlabelled, static)."""
    h = model.heart
    left = np.hypot(np.hypot(model.u - 0.2 * h.lv_radius, model.v) / 22.0, (model.c - 28.0) / 20.0)
    right = np.hypot(np.hypot(model.u + 1.3 * (h.lv_radius + h.wall), model.v) / 20.0, (model.c - 25.0) / 18.0)
    return np.maximum(_soft((1 - left) * 20.0, edge_mm), _soft((1 - right) * 18.0, edge_mm))


def _chest(x: np.ndarray, y: np.ndarray, heart_xy: tuple[float, float], fov: float, edge: float) -> np.ndarray:
    """Static chest cross-section (body, subcutaneous fat, lungs, gentle texture) on an (x, y) mm grid."""
    semi_x, semi_y = 0.47 * fov, 0.40 * fov
    body_radial = np.hypot(x / semi_x, (y - 0.04 * fov) / semi_y)
    body = _soft((1 - body_radial) * semi_y, edge)
    fat = _soft((body_radial - (1 - 12.0 / semi_y)) * semi_y, edge)
    tissue = BODY + 0.04 * np.sin(x / 23.0 + 0.7) * np.cos(y / 31.0 - 0.3)
    chest = body * (tissue * (1 - fat) + FAT * fat)
    for side in (-1.0, 1.0):
        lung_radial = np.hypot((x - heart_xy[0] - side * 0.36 * fov) / (0.12 * fov), (y - heart_xy[1]) / (0.22 * fov))
        lung = _soft((1 - lung_radial) * 0.12 * fov, edge)
        chest = chest * (1 - lung) + LUNG * lung
    return chest


def _bias_field(x: np.ndarray, y: np.ndarray, fov: float, coefficients: tuple[float, ...]) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field (second-order polynomial, amplitude from the vendor)."""
    xn, yn = 2 * x / fov, 2 * y / fov
    a = coefficients
    field = a[0] * xn + a[1] * yn + 0.5 * (a[2] * xn**2 + a[3] * yn**2 + a[4] * xn * yn)
    return np.clip(1.0 + field, 0.3, None)


def _heart_window(centre_mm: float, spacing: float, size: int) -> slice:
    """Voxel range of one axis that holds the heart (± HEART_BOX_MM around its centre)."""
    middle = (size - 1) / 2
    low = int((centre_mm - HEART_BOX_MM) / spacing + middle)
    high = int((centre_mm + HEART_BOX_MM) / spacing + middle) + 2
    return slice(max(0, low), min(size, high))


FrameNoise = Callable[[int], np.random.Generator]
"""The per-frame noise scheme: the generator of one cine frame's noise (its real parts, then its imaginary parts)."""


def _noise_draws(
    noise: np.random.Generator | FrameNoise, frames: Sequence[int], n_frames: int
) -> Iterator[tuple[int, bool, np.random.Generator]]:
    """(cine frame, real part?, generator) of each (Z, Y, X) noise array, in drawing order.

    One generator: the real parts of all `n_frames` frames, then their imaginary parts (one (T, Z, Y, X) array each,
    the generator gives the same numbers in chunks), so it is consumed as for the whole cine. Per-frame generators:
    both parts of each of `frames` only.
    """
    if isinstance(noise, np.random.Generator):
        for real in (True, False):
            for frame in range(n_frames):
                yield frame, real, noise
    else:
        for frame in frames:
            generator = noise(frame)
            yield frame, True, generator
            yield frame, False, generator


def _rician(
    signal: np.ndarray,
    sigma: float,
    noise: np.random.Generator | FrameNoise,
    frames: Sequence[int],
    n_frames: int,
) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (Rician statistics); keeps Fortran order for NIfTI.

    `signal` (X, Y, Z, len(frames)) holds frames `frames` of an `n_frames` cine; the noise is drawn as
    `_noise_draws` orders it and each kept frame gets the noise it would get in the whole cine.
    """
    position = {frame: index for index, frame in enumerate(frames)}
    magnitude = np.empty_like(signal, order="F")
    drawn = np.empty(signal.shape[2::-1], dtype=np.float32)
    for frame, real, generator in _noise_draws(noise, frames, n_frames):
        values = generator.standard_normal(dtype=np.float32, out=drawn).T
        if frame not in position:
            continue
        values *= sigma
        if real:
            values += signal[..., position[frame]]
            magnitude[..., position[frame]] = np.square(values, out=values)
        else:
            magnitude[..., position[frame]] += np.square(values, out=values)
    return np.sqrt(magnitude, out=magnitude)


def _reconstruct(magnitude: np.ndarray, acq: Acquisition) -> np.ndarray:
    """The vendor's reconstruction of each frame, in place: in-plane Gaussian blur (FWHM `blur_mm`), then the gamma
    curve. Both are skipped (an exact identity) at blur 0 and gamma 1."""
    for index in range(magnitude.shape[3]):
        frame = magnitude[..., index]
        if acq.blur_mm > 0:
            sigma = [acq.blur_mm / FWHM_PER_SIGMA / spacing for spacing in acq.spacing] + [0.0]
            frame[...] = gaussian_filter(frame, sigma, mode="nearest")
        if acq.gamma != 1.0:
            np.power(frame, np.float32(acq.gamma), out=frame)
    return magnitude


@dataclass
class Cine:
    """Rendered cine: magnitude signal (X, Y, Z, F) float32, Fortran order, of cine frames `frames` (all T by
    default); labels at ED and ES (X, Y, Z) uint8."""

    signal: np.ndarray
    labels: dict[int, np.ndarray]
    frames: tuple[int, ...]

    def frame(self, frame: int) -> np.ndarray:
        """Signal of cine frame `frame` (X, Y, Z)."""
        return self.signal[..., self.frames.index(frame)]


def render_sax(
    heart: HeartParams,
    acq: Acquisition,
    noise: np.random.Generator | FrameNoise,
    frames: Sequence[int] | None = None,
) -> Cine:
    """Short-axis cine stack with noise, bias field and (3 T) banding; masks at ED and ES (unified label map).

    The noise comes from one generator or from each frame's own (`FrameNoise`). `frames` renders only those cine
    frames (e.g. ED and ES) with the values of the whole cine; one generator is consumed as for the whole cine, of
    per-frame generators only those of `frames` draw.
    """
    nx, ny = acq.matrix
    sx, sy = acq.spacing
    x = (np.arange(nx) - (nx - 1) / 2)[:, None] * sx
    y = (np.arange(ny) - (ny - 1) / 2)[None, :] * sy
    fov = float(max(nx * sx, ny * sy))
    hx, hy = acq.heart_offset_mm
    shading = _bias_field(x, y, fov, acq.bias)
    if acq.banding is not None:
        angle, offset, width = acq.banding
        band = ((x * np.cos(angle) + y * np.sin(angle) - offset) / width) ** 2
        shading = shading * (1 - 0.85 * np.exp(-band))
    chest = _chest(x, y, (hx, hy), fov, 1.5)
    box = (_heart_window(hx, sx, nx), _heart_window(hy, sy, ny))
    a, b = x[box[0], :, None] - hx, y[:, box[1], None] - hy
    cos, sin = np.cos(acq.heart_angle), np.sin(acq.heart_angle)
    c = (acq.first_slice_c - np.arange(acq.n_slices) * acq.slice_step)[None, None, :]
    model = HeartModel(heart, a * cos + b * sin, -a * sin + b * cos, c)
    atria = _atria(model, acq.edge_mm)
    box_chest, box_shading = chest[box][..., None], shading[box][..., None]
    static = (chest * shading).astype(np.float32)[..., None]
    kept = tuple(range(acq.n_frames)) if frames is None else tuple(frames)
    phases = contraction_phase(acq.n_frames, acq.ed, acq.es)
    signal = np.empty((nx, ny, acq.n_slices, len(kept)), dtype=np.float32, order="F")
    labels: dict[int, np.ndarray] = {}
    for index, frame in enumerate(kept):
        heart_signal, heart_labels = _compose(box_chest, model, phases[frame], acq, atria)
        signal[..., index] = static
        signal[(*box, slice(None), index)] = heart_signal * box_shading
        if frame in (acq.ed, acq.es):
            labels[frame] = np.zeros((nx, ny, acq.n_slices), dtype=np.uint8)
            labels[frame][box] = heart_labels
    magnitude = _rician(signal, 1.0 / acq.snr, noise, kept, acq.n_frames)
    return Cine(_reconstruct(magnitude, acq), labels, kept)


def render_four_chamber(heart: HeartParams, acq: Acquisition, noise: np.random.Generator | FrameNoise) -> Cine:
    """Long-axis 4-chamber cine (X, Y, 1, T): the plane v = 0 through both ventricles, c along the image y axis; the
    noise comes from one generator or from each frame's own."""
    sx = acq.spacing[0]
    nx = acq.matrix[0]
    c_values = np.arange(60.0, -(heart.lv_length + 60.0), -sx)
    u = ((np.arange(nx) - (nx - 1) / 2) * sx)[:, None, None]
    c = c_values[None, :, None]
    model = HeartModel(heart, u + 0 * c, np.zeros_like(u + 0 * c), c + 0 * u)
    atria = _atria(model, acq.edge_mm)
    background = (BODY + 0.04 * np.sin(u / 19.0) * np.cos(c / 27.0)) * np.ones_like(model.r)
    signal = np.empty((nx, len(c_values), 1, acq.n_frames), dtype=np.float32, order="F")
    labels: dict[int, np.ndarray] = {}
    for frame, phase in enumerate(contraction_phase(acq.n_frames, acq.ed, acq.es)):
        heart_signal, heart_labels = _compose(background, model, phase, acq, atria)
        signal[..., frame] = heart_signal
        if frame in (acq.ed, acq.es):
            labels[frame] = heart_labels
    frames = tuple(range(acq.n_frames))
    magnitude = _rician(signal, 1.0 / acq.snr, noise, frames, acq.n_frames)
    return Cine(_reconstruct(magnitude, acq), labels, frames)
