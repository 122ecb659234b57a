"""Benchmark of `data_prep.prepare`: subjects/s at CineMA's default geometry (2 workers), peak memory of the tree.

Runs prepare on two synthetic cohorts (small and large) so that the JSON line shows whether peak memory grows with the
cohort size. Usage: `python bench/prepare.py [--subjects-per-vendor 16] [--small 4] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from data_prep.prepare import run_prepare
from data_prep.preprocess import Geometry
from data_prep.synthesize import synthesize

POLL_SECONDS = 0.02
MIB = 2**20


class TreeMemoryPeak:
    """Samples the summed RSS and PSS of this process and all its descendants in a background thread.

    RSS counts pages shared by the forked workers once per process; PSS splits them, so it is the honest total.
    """

    def __init__(self) -> None:
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    info = process.memory_full_info()
                except psutil.NoSuchProcess:
                    continue
                rss += info.rss
                pss += info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(POLL_SECONDS)

    def __enter__(self) -> TreeMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(raw: Path, out: Path, workers: int) -> tuple[int, float, TreeMemoryPeak]:
    """(subjects prepared, seconds, memory peaks) of one prepare run at the default geometry."""
    with TreeMemoryPeak() as memory:
        start = time.perf_counter()
        result = run_prepare([raw], out, seed=0, geometry=Geometry(), workers=workers)
        seconds = time.perf_counter() - start
    if result.problems:
        raise RuntimeError(f"prepare refused {len(result.problems)} synthetic subjects: {result.problems[0]}")
    return len(result.rows), seconds, memory


def main() -> None:
    """Synthesize the two cohorts, time prepare on each, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects-per-vendor", type=int, default=16)
    parser.add_argument("--small", type=int, default=4, help="subjects per vendor of the small cohort")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        work = Path(tmp)
        synthesize(work / "raw_small", args.seed, args.small, workers=args.workers)
        synthesize(work / "raw", args.seed + 1, args.subjects_per_vendor, workers=args.workers)
        small_n, _, small_peak = measure(work / "raw_small", work / "prepared_small", args.workers)
        n, seconds, peak = measure(work / "raw", work / "prepared", args.workers)
    geometry = Geometry()
    print(
        json.dumps(
            {
                "benchmark": "data_prep.prepare",
                "subjects": n,
                "workers": args.workers,
                "crop": list(geometry.crop),
                "spacing": list(geometry.spacing),
                "depth": geometry.depth,
                "seconds": round(seconds, 2),
                "subjects_per_s": round(n / seconds, 2),
                "peak_rss_mib": round(peak.peak_rss / MIB),
                "peak_pss_mib": round(peak.peak_pss / MIB),
                "small_cohort_subjects": small_n,
                "small_cohort_peak_rss_mib": round(small_peak.peak_rss / MIB),
                "small_cohort_peak_pss_mib": round(small_peak.peak_pss / MIB),
            }
        )
    )


if __name__ == "__main__":
    main()
