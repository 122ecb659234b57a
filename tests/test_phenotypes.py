"""Image-derived phenotypes (hand-computed label maps) and the frozen-feature probe that judges a backbone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_prep.phenotypes import PHENOTYPES, phenotypes, subject_phenotypes
from data_prep.records import LV_LABEL, MYO_LABEL, RV_LABEL, InputError, LabelRule
from experiments.probe import pathology_group, probe_scores


def _heart() -> tuple[np.ndarray, np.ndarray]:
    """ED: a 3x3 LV cavity in a 5x5 myocardium on slices 0-2, a 2x2 RV on slices 0-1; ES: 1 LV and 1 RV voxel."""
    ed = np.zeros((10, 10, 4), dtype=np.uint8)
    ed[2:7, 2:7, 0:3] = MYO_LABEL
    ed[3:6, 3:6, 0:3] = LV_LABEL
    ed[7:9, 7:9, 0:2] = RV_LABEL
    es = np.zeros_like(ed)
    es[4, 4, 0:3] = LV_LABEL
    es[7, 7, 0:2] = RV_LABEL
    return ed, es


def test_phenotypes_by_hand():
    values = phenotypes(*_heart(), spacing=(2.0, 2.0, 5.0))  # 20 mm3 voxels, 4 mm2 pixels
    assert list(values) == list(PHENOTYPES)
    expected = {
        "lv_edv_ml": 27 * 20 / 1000,
        "lv_esv_ml": 3 * 20 / 1000,
        "lv_sv_ml": 24 * 20 / 1000,
        "lv_ef": 24 / 27,
        "rv_edv_ml": 8 * 20 / 1000,
        "rv_esv_ml": 2 * 20 / 1000,
        "rv_sv_ml": 6 * 20 / 1000,
        "rv_ef": 6 / 8,
        "myo_ed_ml": 48 * 20 / 1000,
        "myo_es_ml": 0.0,
        # per slice: sqrt((36 + 64) / pi) - sqrt(36 / pi) = 4 / sqrt(pi) mm
        "wall_mean_ed_mm": 4 / math.sqrt(math.pi),
        "wall_max_ed_mm": 4 / math.sqrt(math.pi),
        "wall_mean_es_mm": 0.0,
        "lv_length_ed_mm": 15.0,
        "rv_to_lv_edv": 8 / 27,
    }
    for name, value in expected.items():
        assert values[name] == pytest.approx(value), name


def test_subject_without_es_label_is_refused_naming_the_subject(synthetic_raw):
    from dataclasses import replace

    from data_prep.readers import discover

    record = next(r for r in discover([synthetic_raw], LabelRule()).records if r.es_label is not None)
    assert subject_phenotypes(record)["lv_edv_ml"] > 0
    with pytest.raises(InputError, match=record.subject_id):
        subject_phenotypes(replace(record, es_label=None))


def _cohort(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict:
    return {
        "subject_ids": [f"s{i}" for i in range(len(labels))],
        "features": features,
        "labels": labels,
        "groups": groups,
    }


def test_probe_finds_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    groups = np.array(["NOR", "LV_DILATED", "LV_HYPERTROPHY", "RV_ABNORMAL"] * 40)
    labels = (groups != "NOR").astype(int)
    codes = np.stack([groups == g for g in np.unique(groups)], axis=1).astype(float)
    informative = np.concatenate([codes * 2 + rng.normal(0, 0.5, codes.shape), rng.normal(size=(160, 12))], axis=1)
    noise = rng.normal(size=(160, 16))
    signal = probe_scores(_cohort(informative, labels, groups), seed=0, shifted=_cohort(noise, labels, groups))
    assert signal["auroc"] > 0.95 and signal["group_macro_recall"] > 0.9
    assert signal["n_subjects"] == 160 and signal["n_healthy"] == 40
    # The shifted rendering carries nothing: refit or transferred, the probe is at chance there.
    assert abs(signal["shifted_cv"]["auroc"] - 0.5) < 0.15
    assert abs(signal["shifted_transfer"]["auroc"] - 0.5) < 0.15
    with pytest.raises(ValueError, match="same subjects"):
        probe_scores(_cohort(noise, labels, groups), shifted=_cohort(noise, labels, groups) | {"subject_ids": []})


def test_pathology_groups_cover_every_code_and_refuse_unknown_ones():
    from data_prep.records import KNOWN_CODES

    for code in set().union(*KNOWN_CODES.values()):
        assert pathology_group(code)
    assert pathology_group("DCM") == pathology_group("MINF") != pathology_group("HCM") == pathology_group("HHD")
    with pytest.raises(ValueError, match="subject 's1'.*'XYZ'"):
        pathology_group("XYZ", "s1")


def test_probe_refuses_a_cohort_too_small_for_its_folds_naming_the_class():
    rng = np.random.default_rng(1)
    groups = np.array(["NOR"] * 3 + ["LV_DILATED"] * 30)
    cohort = _cohort(rng.normal(size=(33, 4)), (groups != "NOR").astype(int), groups)
    with pytest.raises(ValueError, match="5-fold CV needs 5 subjects of every class.*0: 3"):
        probe_scores(cohort)
