"""The final evaluation's protocol: calibrate the global model's pooled threshold from summed histograms, then test.

Sites never send a validation score: each returns the per-class histogram of its validation scores on the
HISTOGRAM_BINS grid (models.metrics), and the pooled threshold is chosen on the sum, exactly as a single site or the
centralized baseline chooses theirs on their own histogram.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from models.metrics import HISTOGRAM_BINS, threshold_from_histogram
from models.protocol import MIN_SUBJECTS_PER_FIGURE, VAL_HISTOGRAM_KEY


def histogram_problem(value: Any) -> str:
    """Why `value` is not a calibration histogram a site may send ("" when it is one): 2 x HISTOGRAM_BINS
    non-negative integers counting at least MIN_SUBJECTS_PER_FIGURE subjects."""
    try:
        histogram = np.asarray(value)
    except (TypeError, ValueError) as error:
        return f"not an array ({error})"
    if histogram.shape != (2, HISTOGRAM_BINS) or histogram.dtype.kind not in "iu" or (histogram < 0).any():
        return f"not 2 x {HISTOGRAM_BINS} non-negative integers"
    if histogram.sum() < MIN_SUBJECTS_PER_FIGURE:
        return f"counts {int(histogram.sum())} subjects, fewer than {MIN_SUBJECTS_PER_FIGURE}"
    return ""


def site_histogram(metrics: Mapping[str, Any] | None, site: str) -> np.ndarray | None:
    """A site's calibration histogram, None when it sent none; a malformed one is an error naming the site."""
    if not metrics or VAL_HISTOGRAM_KEY not in metrics:
        return None
    problem = histogram_problem(metrics[VAL_HISTOGRAM_KEY])
    if problem:
        raise ValueError(f"site {site}: {VAL_HISTOGRAM_KEY} is {problem}")
    return np.asarray(metrics[VAL_HISTOGRAM_KEY])


def pooled_threshold(histograms: Iterable[np.ndarray]) -> dict[str, Any] | None:
    """The global model's threshold chosen on the summed histograms, with the counts it rests on; None if empty."""
    histograms = list(histograms)
    if not histograms:
        return None
    total = np.sum(histograms, axis=0)
    return {
        "threshold": threshold_from_histogram(total),
        "n_sites": len(histograms),
        "n_val_healthy": int(total[0].sum()),
        "n_val_diseased": int(total[1].sum()),
    }
