"""One benchmark unit for real: a small benchmark cohort, `med_duallora` for two seeds as replicas of one NVFlare
simulator job, and the centralized baseline, turned into records the report reads."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.benchmark_cohort import BenchmarkCohortSpec
from data_prep.splits import REFERENCE_TEST_SPLIT
from data_prep.vendors import REFERENCE_VENDOR
from experiments.cohorts import cohort_data
from experiments.records import RECORD_SCHEMA, read_record, write_record
from experiments.runs import METHODS, RunSettings, run_unit
from models.protocol import SITES

pytestmark = pytest.mark.slow

SPEC = BenchmarkCohortSpec(train_per_site=6, val_per_site=6, test_per_site=10, min_test_healthy=4)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> RunSettings:
    out = tmp_path_factory.mktemp("bench_cohort")
    data = cohort_data(out / "h1.0", SPEC, [0, 1], workers=2, log=lambda line: None)
    return RunSettings(data=data, rounds=2, local_epochs=1, batch_size=2, log=lambda line: None)


@pytest.fixture(scope="module")
def federated(settings, tmp_path_factory) -> dict[int, dict]:
    return run_unit(METHODS["med_duallora"], settings, [0, 1], tmp_path_factory.mktemp("unit"))


def _check_sites(body: dict, kinds: set[str]) -> None:
    assert set(body["sites"]) == set(SITES)
    for site in SITES:
        entry = body["sites"][site]
        assert len(entry["test_ids"]) == SPEC.test_per_site and sum(entry["test_labels"]) == SPEC.test_per_site - 4
        assert len(entry["val_ids"]) == SPEC.val_per_site
        assert set(entry["models"]) == kinds
        for model in entry["models"].values():
            assert 0.0 <= model["threshold"] <= 1.0
            for split, n in (("test", SPEC.test_per_site), (REFERENCE_TEST_SPLIT, SPEC.test_per_site), ("val", 6)):
                assert len(model[split]) == n and all(0.0 <= p <= 1.0 for p in model[split])
            # the same hearts: rendered alike at the Siemens site, otherwise in another appearance
            assert (model["test"] == model[REFERENCE_TEST_SPLIT]) == (site == REFERENCE_VENDOR)


def test_each_replica_of_a_federated_unit_is_scored_on_the_fixed_test_set(federated, tmp_path):
    assert set(federated) == {0, 1}
    for seed, body in federated.items():
        _check_sites(body, {"personalised", "global"})
        assert body["cost"]["seeds_in_job"] == 2 and body["cost"]["bytes_sent_per_client_round"] > 0
        assert {(entry["round"], entry["site"]) for entry in body["rounds"]} == {(r, s) for r in (0, 1) for s in SITES}
        assert all("auroc" in entry for entry in body["rounds"])
        record = {
            "schema": RECORD_SCHEMA,
            "condition": {"name": "h1.0"},
            "method": "med_duallora",
            "seed": seed,
            "hyperparameters": {},
            **body,
        }
        write_record(tmp_path / f"{seed}.json.gz", record)
        assert read_record(tmp_path / f"{seed}.json.gz") == record
    zero, one = (federated[seed]["sites"]["ge"] for seed in (0, 1))
    assert zero["test_ids"] == one["test_ids"] and zero["test_labels"] == one["test_labels"]  # the same test set
    assert zero["val_ids"] != one["val_ids"]  # each seed's own training and validation subjects
    assert not np.allclose(zero["models"]["personalised"]["test"], one["models"]["personalised"]["test"])


def test_the_centralized_baseline_gives_the_same_record_shape(settings, federated, tmp_path):
    body = run_unit(METHODS["centralized"], settings, [1], tmp_path)[1]
    _check_sites(body, {"central"})
    assert body["sites"]["ge"]["test_ids"] == federated[1]["sites"]["ge"]["test_ids"]
    assert body["cost"]["bytes_sent_per_client_round"] is None
