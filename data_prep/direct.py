"""The cheap path: a synthetic subject's prepared volume straight from its plan, identical to synthesize + prepare.

`data_prep.synthesize` renders every cine frame, the long-axis view and all files; `data_prep.prepare` then reads back
two frames and the ED label. This path renders only those (the ED and ES frames and their labels), consuming the
subject's generators exactly as the full path does (see `phantom.render_sax`), converts them as the files store and
the readers read them, and runs the same array-level preprocessing. No file is written. Under the default noise
scheme the main generator still draws the noise of every frame; under the per-frame scheme (`frame_noise`) only
the ED and ES frames' noise is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_prep.layouts import stored_values
from data_prep.phantom import render_sax
from data_prep.prepare import parse_args
from data_prep.preprocess import Geometry, PreparedVolume, preprocess_arrays
from data_prep.synthesize import SubjectPlan, annotated, cine_noise, draw_subject, sax_affine

GEOMETRY_OPTIONS = ("--crop", "--spacing", "--depth")


def stored_affine(affine: np.ndarray) -> np.ndarray:
    """The affine nibabel gives back for a saved file: the sform's rows are stored as float32."""
    stored = np.array(affine, dtype=np.float64)
    stored[:3] = stored[:3].astype(np.float32)
    return stored


def prepare_direct(
    plan: SubjectPlan,
    seed: int,
    geometry: Geometry,
    heterogeneity: float = 1.0,
    render_profile: str | None = None,
    frame_noise: bool = False,
) -> PreparedVolume:
    """The prepared volume `data_prep.prepare` gives for `plan` written by `data_prep.synthesize` with `seed`,
    `heterogeneity`, `render_profile` and `frame_noise` (bit-identical, tests/test_direct_render.py), without
    rendering the other frames or writing a file.

    Label maps are stored in the dataset's own numbering and read back through its inverse map: the unified labels
    come back unchanged, so they are used as rendered.
    """
    rng, subject = draw_subject(plan, seed, heterogeneity, render_profile)
    acq = subject.acq
    cine = render_sax(subject.heart, acq, cine_noise(plan, seed, "sax", rng, frame_noise), frames=(acq.ed, acq.es))
    affine = stored_affine(sax_affine(plan, acq, rng))
    images = np.stack([stored_values(cine.frame(frame), subject.appearance) for frame in (acq.ed, acq.es)])
    label = cine.labels[acq.ed] if annotated(plan) else None
    names = [f"{plan.dataset}_{plan.pid} (synthetic index {plan.index}) {phase}" for phase in ("ED", "ES")]
    return preprocess_arrays(images.astype(np.float32), label, affine, geometry, "raw", names)


def geometry_from_args(arguments: Sequence[str]) -> Geometry:
    """The Geometry that `data_prep.prepare` geometry options give (e.g. models.standin.prepare_args()), parsed by
    prepare's own parser; ValueError for any other option or a bad value."""
    options = sorted({a.split("=")[0] for a in arguments if a.startswith("--")} - set(GEOMETRY_OPTIONS))
    if options:
        raise ValueError(
            f"geometry options {list(arguments)}: {options} not allowed (only {', '.join(GEOMETRY_OPTIONS)})"
        )
    try:
        parsed = parse_args(["--raw", ".", "--out", ".", *arguments])
    except SystemExit:
        raise ValueError(f"geometry options {list(arguments)}: not valid data_prep.prepare options") from None
    return Geometry(tuple(parsed.crop), tuple(parsed.spacing), parsed.depth)
