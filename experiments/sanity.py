"""The benchmark's sanity figures: how well the frozen backbone separates the classes at each vendor (a linear probe
on each site's fixed test set), and how recognisable each vendor is from its images (bench/vendor_id.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.splits import REFERENCE_TEST_SPLIT
from experiments.probe import cohort_features, probe_auroc
from models.atomic_io import write_json_atomic
from models.loading import load_cinema
from models.protocol import SITES
from models.standin import standin_files

SANITY_FILE = "sanity.json"
VENDOR_ID_FILE = "vendor_id.json"
"""`python bench/vendor_id.py > docs/results/vendor_id.json`: vendor-ID accuracy from prepared images, by h."""


def probe_by_vendor(prepared: Path, split: str = "test") -> dict[str, dict[str, Any]]:
    """Per site, the stand-in's frozen-feature probe (experiments.probe: 5-fold CV, class-balanced logistic
    regression) on that site's `split` subjects: healthy-vs-diseased AUROC and how many subjects it rests on."""
    weights, config = standin_files()
    backbone = load_cinema(weights, config)
    result = {}
    for site in SITES:
        cohort = cohort_features(
            backbone, prepared, keep=lambda row, site=site: (row["client"], row["split"]) == (site, split)
        )
        labels = cohort["labels"]
        result[site] = {"auroc": probe_auroc(cohort), "n": len(labels), "n_healthy": int((labels == 0).sum())}
    return result


def write_sanity(results_dir: Path, headline_root: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`<results>/sanity.json`: the probe per vendor on the headline cohort's test sets (own and Siemens-profile
    renderings) and, when bench/vendor_id.py's output is in the results folder, the vendor-ID accuracy by h."""
    sanity: dict[str, Any] = {
        "probe_auroc_by_vendor": probe_by_vendor(headline_root),
        "probe_auroc_by_vendor_siemens_rendering": probe_by_vendor(headline_root, REFERENCE_TEST_SPLIT),
        "probe": "frozen stand-in features, class-balanced logistic regression, stratified 5-fold CV, per site",
    }
    vendor_id = Path(results_dir) / VENDOR_ID_FILE
    if vendor_id.is_file():
        report = json.loads(vendor_id.read_text(encoding="utf-8"))
        if "accuracy" not in report:
            raise ValueError(f"{vendor_id}: field accuracy missing (write it with `python bench/vendor_id.py`)")
        sanity["vendor_id_accuracy"] = report["accuracy"]
    write_json_atomic(Path(results_dir) / SANITY_FILE, sanity)
    log(f"sanity figures written to {Path(results_dir) / SANITY_FILE}")
    return sanity
