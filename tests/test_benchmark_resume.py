"""The benchmark resumes from its records: a unit whose seeds all have records is skipped, only missing seeds run,
an interrupted or failed unit leaves no record and runs again, and records of another configuration are refused.

The simulator jobs and the cohort builder are replaced by fakes (the real ones are exercised by
tests/test_simulator.py, tests/test_benchmark_unit.py and tests/test_benchmark_cohort.py): here only the runner's
bookkeeping is under test.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest

from data_prep.benchmark_cohort import settings_draws
from experiments import benchmark
from experiments.benchmark import ConfigurationMismatch, Sizes, check_configuration, pending_seeds, run_units
from experiments.design import HEADLINE, NEGATIVE_CONTROL, PARTS, SWEEP_METHODS, Unit, units_of
from experiments.extend import NotExtendable
from experiments.preregistration import Hyperparameters
from experiments.records import RecordError, read_record, record_path
from experiments.runs import METHODS, VARIANTS, RunSettings
from models.protocol import SITES

HYPERPARAMETERS = Hyperparameters(rounds=2, local_epochs=1, lr=1e-3)
SIZES = Sizes(train_per_site=4, val_per_site=4, test_per_site=6, min_test_healthy=2)


def fake_body(method: str, seed: int) -> dict:
    """A record body like a real run's: every site scores its test subjects with each model kind."""
    sites = {}
    for index, site in enumerate(SITES):
        ids = [f"{site}-{n}" for n in range(6)]
        scores = [round(0.1 * n + 0.01 * (seed + index), 5) for n in range(6)]
        sites[site] = {
            "test_ids": ids,
            "test_labels": [0, 0, 1, 1, 1, 1],
            "val_ids": ids[:4],
            "val_labels": [0, 1, 1, 1],
            "models": {"personalised": {"threshold": 0.5, "test": scores, "test_siemens": scores, "val": scores[:4]}},
        }
    return {"sites": sites, "rounds": [], "cost": {"seeds_in_job": 2, "method": method}}


class FakeUnits:
    """Stands in for experiments.runs.run_unit: records which (unit, seeds) ran; can fail on a chosen method."""

    def __init__(self, fail_on: str | None = None, interrupt_on: str | None = None):
        self.fail_on, self.interrupt_on = fail_on, interrupt_on
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, method, settings, seeds, unit_dir):
        self.calls.append((method.name, tuple(seeds)))
        assert settings.rounds == HYPERPARAMETERS.rounds and settings.data.endswith("seed_{seed}")
        if method.name == self.interrupt_on:
            raise KeyboardInterrupt
        if method.name == self.fail_on:
            raise RuntimeError("the federated run did not complete")
        return {seed: fake_body(method.name, seed) for seed in seeds}


@pytest.fixture
def fakes(monkeypatch):
    def install(units: FakeUnits) -> FakeUnits:
        monkeypatch.setattr(benchmark, "run_unit", units)
        monkeypatch.setattr(benchmark, "cohort_data", lambda out, spec, seeds, workers, log: f"{out}/seed_{{seed}}")
        return units

    return install


def run(tmp_path: Path, units: list[Unit], seeds=(0, 1), sizes: Sizes = SIZES) -> list:
    base = RunSettings(data="", log=lambda line: None)
    return run_units(units, tmp_path / "results", tmp_path / "work", base, HYPERPARAMETERS, sizes, seeds, 1)


UNITS = [Unit(HEADLINE, "med_duallora"), Unit(HEADLINE, "fedit"), Unit(NEGATIVE_CONTROL, "local_only")]


def test_finished_units_are_skipped_and_only_missing_seeds_run(tmp_path, fakes):
    first = fakes(FakeUnits())
    assert run(tmp_path, UNITS) == []
    assert first.calls == [("med_duallora", (0, 1)), ("fedit", (0, 1)), ("local_only", (0, 1))]
    record_path(tmp_path / "results", HEADLINE.name, "fedit", 1).unlink()
    again = fakes(FakeUnits())
    assert run(tmp_path, UNITS, seeds=(0, 1, 2)) == []
    assert again.calls == [("med_duallora", (2,)), ("fedit", (1, 2)), ("local_only", (2,))]
    record = read_record(record_path(tmp_path / "results", HEADLINE.name, "fedit", 2))
    assert record["condition"]["name"] == "h1.0" and record["condition"]["role"] == "headline"
    assert record["hyperparameters"]["rounds"] == 2 and record["cohort"]["test_per_site"] == 6


def test_a_failed_unit_leaves_no_record_and_the_others_still_run(tmp_path, fakes):
    fakes(FakeUnits(fail_on="fedit"))
    failed = run(tmp_path, UNITS)
    assert [unit.method for unit, _ in failed] == ["fedit"] and "did not complete" in failed[0][1]
    assert pending_seeds(tmp_path / "results", UNITS[1], (0, 1)) == [0, 1]
    assert pending_seeds(tmp_path / "results", UNITS[2], (0, 1)) == []
    retry = fakes(FakeUnits())
    assert run(tmp_path, UNITS) == [] and retry.calls == [("fedit", (0, 1))]


def test_an_interruption_stops_the_benchmark_and_the_unit_runs_again(tmp_path, fakes):
    fakes(FakeUnits(interrupt_on="fedit"))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, UNITS)
    assert pending_seeds(tmp_path / "results", UNITS[1], (0, 1)) == [0, 1]
    retry = fakes(FakeUnits())
    run(tmp_path, UNITS)
    assert retry.calls == [("fedit", (0, 1)), ("local_only", (0, 1))]


def test_a_record_in_the_wrong_place_or_corrupt_is_refused(tmp_path, fakes):
    fakes(FakeUnits())
    run(tmp_path, UNITS[:1])
    path = record_path(tmp_path / "results", HEADLINE.name, "med_duallora", 0)
    moved = record_path(tmp_path / "results", HEADLINE.name, "fedit", 0)
    moved.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="do not match its place"):
        pending_seeds(tmp_path / "results", Unit(HEADLINE, "fedit"), (0,))
    record = json.loads(gzip.decompress(path.read_bytes()))
    del record["sites"]["ge"]["test_labels"]
    path.write_bytes(gzip.compress(json.dumps(record).encode()))
    with pytest.raises(RecordError, match=r"sites.ge lacks \['test_labels'\]"):
        pending_seeds(tmp_path / "results", UNITS[0], (0,))


def test_records_lacking_a_test_draw_are_extended_where_the_models_are_left_and_run_again_elsewhere(
    tmp_path, fakes, monkeypatch
):
    fakes(FakeUnits())
    run(tmp_path, UNITS[:2], sizes=replace(SIZES, test_draws=1))
    extended = []

    def extend_fedit_only(record, spec, scorer, unit_dir, log):
        if record["method"] != "fedit":
            raise NotExtendable(f"{unit_dir}: no exported model")  # as when the workspace is gone (a fresh clone)
        extended.append((record["method"], record["seed"], scorer.cohort_dir.name))
        return {**record, "cohort": spec.settings()}

    monkeypatch.setattr(benchmark, "extend_record", extend_fedit_only)
    again = fakes(FakeUnits())
    assert run(tmp_path, UNITS[:2]) == []
    assert again.calls == [("med_duallora", (0, 1))]
    assert extended == [("fedit", 0, HEADLINE.name), ("fedit", 1, HEADLINE.name)]
    for method in ("med_duallora", "fedit"):
        record = read_record(record_path(tmp_path / "results", HEADLINE.name, method, 1))
        assert settings_draws(record["cohort"]) == SIZES.test_draws == 2
    last = fakes(FakeUnits())
    assert run(tmp_path, UNITS[:2]) == [] and last.calls == []


def test_results_of_another_configuration_are_refused(tmp_path):
    check_configuration(tmp_path, {"sizes": {"test_per_site": 300}, "quick": False})
    check_configuration(tmp_path, {"sizes": {"test_per_site": 300}, "quick": False})
    with pytest.raises(ConfigurationMismatch, match="differs in sizes"):
        check_configuration(tmp_path, {"sizes": {"test_per_site": 40}, "quick": False})


def test_the_parts_cover_the_design_once():
    headline = {unit.method for unit in PARTS["headline"]}
    assert headline == set(METHODS)
    sweep = PARTS["sweep-low"] + PARTS["sweep-high"]
    assert {unit.condition.heterogeneity for unit in sweep} == {0.0, 0.5, 1.5}
    assert {unit.method for unit in sweep} == set(SWEEP_METHODS) <= headline
    roles = {unit.condition.role for unit in PARTS["controls"]}
    assert roles == {"negative control", "positive control"}
    assert {unit.method for unit in PARTS["privacy"]} == set(VARIANTS)
    assert {unit.condition for unit in PARTS["privacy"]} == {HEADLINE}  # compared with the headline's runs
    everything = units_of(("headline", "sweep-low", "sweep-high", "controls", "privacy", "headline"))
    assert len(everything) == len(set(everything)) == sum(len(units) for units in PARTS.values())
    quick = units_of(tuple(PARTS), quick=True)
    assert {unit.condition.heterogeneity for unit in quick if unit.condition.role == "sweep"} == {0.0}
    assert set(quick) < set(everything) and {unit.condition.role for unit in quick} == {
        "headline",
        "sweep",
        "negative control",
        "positive control",
    }
