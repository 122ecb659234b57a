"""Frozen-feature probe of a backbone: class-balanced logistic regression under 5-fold CV on a prepared cohort.

The bar a stand-in backbone must pass (healthy-vs-diseased AUROC, macro recall over structural pathology groups) and
the domain-shift figure (the same hearts rendered with another vendor's profile) are both measured here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import recall_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_prep.preprocess import read_volume
from data_prep.report import read_manifest
from models.convvit import ConvViT

N_FOLDS = 5
PROBE_C = 0.1
"""Inverse L2 strength of the probe; fixed before any probe was scored (features are standardised)."""
PATHOLOGY_GROUPS: dict[str, str] = {
    "NOR": "NOR",
    **dict.fromkeys(("DCM", "MINF", "IHD", "LV", "AHS"), "LV_DILATED"),
    **dict.fromkeys(("HCM", "HHD"), "LV_HYPERTROPHY"),
    **dict.fromkeys(("RV", "ARV", "ARR", "TRI", "CIA", "FALL"), "RV_ABNORMAL"),
    "Other": "OTHER",
}
"""Each pathology code's structural group: the structure data_prep/anatomy.py changes for it."""


def pathology_group(code: str, subject_id: str = "") -> str:
    """The structural group of a pathology code; an unknown code is an error naming the subject."""
    if code not in PATHOLOGY_GROUPS:
        raise ValueError(f"subject {subject_id!r}: pathology {code!r} has no group in {sorted(PATHOLOGY_GROUPS)}")
    return PATHOLOGY_GROUPS[code]


@torch.no_grad()
def cohort_features(
    backbone: ConvViT, prepared: Path, batch_size: int = 16, keep: Callable[[Mapping[str, str]], bool] | None = None
) -> dict[str, Any]:
    """Frozen features of every subject of a prepared root (those whose manifest row `keep` accepts), with its
    subject id, label and pathology group."""
    rows = [row for row in read_manifest(prepared / "manifest.csv") if keep is None or keep(row)]
    rows.sort(key=lambda row: row["subject_id"])
    backbone.eval()
    features = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        images = torch.from_numpy(np.stack([read_volume(prepared / row["image"]) for row in batch])).float()
        features.append(backbone.features(images).numpy())
    return {
        "subject_ids": [row["subject_id"] for row in rows],
        "features": np.concatenate(features),
        "labels": np.array([int(row["label"]) for row in rows]),
        "groups": np.array([pathology_group(row["pathology"], row["subject_id"]) for row in rows]),
    }


def _probe() -> Any:
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=5000, random_state=0)
    )


def _out_of_fold(
    features: np.ndarray, targets: np.ndarray, seed: int, transfer_features: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Out-of-fold class probabilities (stratified 5-fold CV); with `transfer_features` (the same subjects seen
    otherwise), also the fold's probe applied to them."""
    names, counts = np.unique(targets, return_counts=True)
    if counts.min() < N_FOLDS:
        raise ValueError(
            f"the probe's {N_FOLDS}-fold CV needs {N_FOLDS} subjects of every class; "
            f"got {dict(zip(names.tolist(), counts.tolist(), strict=True))}: probe a larger cohort"
        )
    folds = StratifiedKFold(N_FOLDS, shuffle=True, random_state=seed)
    n_classes = len(np.unique(targets))
    own = np.zeros((len(targets), n_classes))
    other = np.zeros_like(own) if transfer_features is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, test in folds.split(features, targets):
            probe = _probe().fit(features[train], targets[train])
            own[test] = probe.predict_proba(features[test])
            if other is not None:
                other[test] = probe.predict_proba(transfer_features[test])
    return own, other


def _scores(probabilities: np.ndarray, labels: np.ndarray, group_probabilities: np.ndarray, groups: np.ndarray):
    classes = np.unique(groups)
    return {
        "auroc": round(float(roc_auc_score(labels, probabilities[:, 1])), 4),
        "group_macro_recall": round(
            float(recall_score(groups, classes[group_probabilities.argmax(1)], average="macro")), 4
        ),
    }


def probe_auroc(cohort: Mapping[str, Any], seed: int = 0) -> float:
    """Healthy-vs-diseased AUROC of out-of-fold probe predictions on `cohort` (no pathology groups needed)."""
    labels = np.asarray(cohort["labels"])
    probabilities, _ = _out_of_fold(cohort["features"], labels, seed)
    return round(float(roc_auc_score(labels, probabilities[:, 1])), 4)


def probe_scores(cohort: Mapping[str, Any], seed: int = 0, shifted: Mapping[str, Any] | None = None) -> dict:
    """Healthy-vs-diseased AUROC and group macro recall of out-of-fold probe predictions on `cohort`.

    With `shifted` (the same subjects rendered with another vendor's profile), also: the probe refit under CV on
    the shifted rendering (`shifted_cv`), and each fold's probe trained on `cohort` scoring the held-out subjects'
    shifted renderings (`shifted_transfer`), the drop a deployed model would see.
    """
    labels, groups = np.asarray(cohort["labels"]), np.asarray(cohort["groups"])
    other = None
    if shifted is not None:
        if list(shifted["subject_ids"]) != list(cohort["subject_ids"]):
            raise ValueError("the shifted cohort must hold the same subjects as the probed cohort")
        other = np.asarray(shifted["features"])
    binary, binary_other = _out_of_fold(cohort["features"], labels, seed, other)
    grouped, grouped_other = _out_of_fold(cohort["features"], groups, seed, other)
    result = {
        "n_subjects": len(labels),
        "n_healthy": int((labels == 0).sum()),
        "groups": {str(g): int((groups == g).sum()) for g in np.unique(groups)},
        **_scores(binary, labels, grouped, groups),
    }
    if shifted is not None:
        binary_cv, _ = _out_of_fold(other, labels, seed)
        grouped_cv, _ = _out_of_fold(other, groups, seed)
        result["shifted_cv"] = _scores(binary_cv, labels, grouped_cv, groups)
        result["shifted_transfer"] = _scores(binary_other, labels, grouped_other, groups)
    return result


def probe_backbone(backbone: ConvViT, prepared: Path, shifted: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """`probe_scores` of a backbone's frozen features on a prepared cohort (and its shifted rendering)."""
    cohort = cohort_features(backbone, prepared)
    other = cohort_features(backbone, shifted) if shifted is not None else None
    return probe_scores(cohort, seed, other)
