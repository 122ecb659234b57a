"""Vendor identifiability of prepared synthetic volumes by heterogeneity: accuracy of a simple vendor classifier.

`python bench/vendor_id.py` prints one JSON line. For each heterogeneity h it prepares a cohort of
`--subjects-per-vendor` subjects per vendor with the direct path (data_prep/direct.py, bit-identical to synthesize +
prepare) at the stand-in's geometry (`models.standin.prepare_args()`), reads each volume as the data module holds
it (uint8), summarises it in a few intensity statistics per channel (mean, std, 5/25/50/75/95th percentiles, in-plane
gradient energy, a noise estimate) and scores a standardised multinomial logistic regression under stratified 5-fold
cross-validation with a fixed seed. Chance is 1/4; the acceptance bar is <= 0.30 at h = 0 and >= 0.75 at h = 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_prep.direct import geometry_from_args, prepare_direct
from data_prep.preprocess import Geometry, stored_volume, to_uint8
from data_prep.synthesize import SubjectPlan, plan_cohort
from models.protocol import SITES
from models.standin import prepare_args

HETEROGENEITIES = (0.0, 0.5, 1.0, 1.5)
N_FOLDS = 5
PERCENTILES = (5, 25, 50, 75, 95)
STATISTICS = (
    "mean",
    "std",
    *(f"p{q}" for q in PERCENTILES),
    "gradient_energy",
    "noise",
)
H0_MAX, H1_MIN = 0.30, 0.75
MAD_TO_SD = 0.6745
"""Median absolute deviation of a Gaussian in units of its standard deviation."""


def features(volume: np.ndarray) -> np.ndarray:
    """STATISTICS of each channel of a (2, X, Y, Z) uint8 volume (as [0, 1] floats), ED then ES."""
    values = []
    for channel in volume.astype(np.float32) / 255.0:
        gradient = (np.mean(np.diff(channel, axis=0) ** 2) + np.mean(np.diff(channel, axis=1) ** 2)) / 2
        laplacian = 4 * channel[1:-1, 1:-1] - channel[:-2, 1:-1] - channel[2:, 1:-1]
        laplacian -= channel[1:-1, :-2] + channel[1:-1, 2:]
        noise = np.median(np.abs(laplacian)) / MAD_TO_SD / np.sqrt(20.0)  # white noise: variance 16 + 4 times
        values += [channel.mean(), channel.std(), *np.percentile(channel, PERCENTILES), gradient, noise]
    return np.asarray(values, dtype=np.float64)


def _subject_features(task: tuple[SubjectPlan, int, Geometry, float]) -> np.ndarray:
    plan, seed, geometry, heterogeneity = task
    return features(to_uint8(stored_volume(prepare_direct(plan, seed, geometry, heterogeneity))))


def _worker_init() -> None:
    """One intra-op thread per worker process: parallelism comes from the processes."""
    torch.set_num_threads(1)


def cohort_features(
    heterogeneity: float, subjects_per_vendor: int, seed: int, geometry: Geometry, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """(features, vendor index) of every subject of the cohort at `heterogeneity`."""
    plans = plan_cohort(seed, subjects_per_vendor, heterogeneity=heterogeneity)
    tasks = [(plan, seed, geometry, heterogeneity) for plan in plans]
    with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
        rows = pool.map(_subject_features, tasks, chunksize=4)
    return np.stack(rows), np.array([SITES.index(plan.vendor) for plan in plans])


def vendor_accuracy(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Out-of-fold accuracy of a standardised logistic regression (stratified 5-fold CV, shuffled with `seed`)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    folds = StratifiedKFold(N_FOLDS, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_predict(model, x, y, cv=folds) == y))


def main() -> None:
    """Prepare a cohort per heterogeneity, score the vendor classifier on each, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects-per-vendor", type=int, default=100)
    parser.add_argument("--heterogeneity", type=float, nargs="+", default=list(HETEROGENEITIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    geometry = geometry_from_args(prepare_args())
    start = time.perf_counter()
    accuracy, seconds = {}, {}
    for heterogeneity in args.heterogeneity:
        begin = time.perf_counter()
        x, y = cohort_features(heterogeneity, args.subjects_per_vendor, args.seed, geometry, args.workers)
        accuracy[str(heterogeneity)] = round(vendor_accuracy(x, y, args.seed), 4)
        seconds[str(heterogeneity)] = round(time.perf_counter() - begin, 1)
    checks = {"h0_at_most": (0.0, H0_MAX, "max"), "h1_at_least": (1.0, H1_MIN, "min")}
    passed = {
        name: (accuracy[str(h)] <= bar if kind == "max" else accuracy[str(h)] >= bar)
        for name, (h, bar, kind) in checks.items()
        if str(h) in accuracy
    }
    print(
        json.dumps(
            {
                "benchmark": "vendor_id",
                "subjects_per_vendor": args.subjects_per_vendor,
                "vendors": list(SITES),
                "seed": args.seed,
                "workers": args.workers,
                "prepare_args": prepare_args(),
                "features_per_channel": list(STATISTICS),
                "classifier": f"standardised multinomial logistic regression, stratified {N_FOLDS}-fold CV",
                "chance": round(1 / len(SITES), 4),
                "accuracy": accuracy,
                "required": {"h0_at_most": H0_MAX, "h1_at_least": H1_MIN},
                "passed": passed,
                "seconds_per_heterogeneity": seconds,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
