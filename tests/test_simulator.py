"""Real NVFlare simulator runs of the med_duallora job (micro ConvViT, four sites), judged by their artifacts.

Two rounds in one go, and the same two rounds with the server restarted in between from its persisted global model.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from custom.site_state import SiteState, site_state_dir
from jobs.recipe import INITIAL_CHECKPOINT, FederationConfig, export_job, initial_global_state
from jobs.simulate import SimulatorRun
from models.protocol import SITES

pytestmark = pytest.mark.slow

CONFIG = FederationConfig.for_method(rounds=2, local_epochs=1, min_clients=4)


@pytest.fixture(scope="module")
def finished_run(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulatorRun, Path]:
    root = tmp_path_factory.mktemp("simulator")
    return simulate_sites(export_job(CONFIG, root / "jobs"), root), root / "site_state"


@pytest.fixture(scope="module")
def restarted_run(simulate_sites, tmp_path_factory: pytest.TempPathFactory):
    """Round 0 in a first run; then a new server starts from that run's persisted global model for round 1."""
    root = tmp_path_factory.mktemp("restart")
    state_root = root / "site_state"
    first = simulate_sites(export_job(CONFIG.replace(rounds=1), root / "first" / "jobs"), root / "first", state_root)
    saved = {site: SiteState(site_state_dir(CONFIG.job_name, site, str(state_root))).load() for site in SITES}
    resumed = CONFIG.replace(rounds=1, start_round=1, resume_from=str(first.global_model_path))
    second = simulate_sites(export_job(resumed, root / "second" / "jobs"), root / "second", state_root)
    return first, saved, second, state_root


def test_the_run_completed(finished_run):
    run, _ = finished_run
    assert run.problems() == []


def test_the_global_model_holds_exactly_the_shared_keys_and_trained(finished_run):
    run, _ = finished_run
    initial = initial_global_state(CONFIG)
    final = run.global_model()
    assert set(final) == set(initial)
    policy = CONFIG.policy
    assert all(policy.is_shared(key) for key in final)
    lora_b = [key for key in final if ".lora_B." in key]
    assert lora_b and all(torch.count_nonzero(initial[key]) == 0 for key in lora_b)
    assert any(torch.count_nonzero(final[key]) > 0 for key in lora_b), "global B stayed at its zero initialisation"


def test_each_site_keeps_its_own_local_adapter(finished_run):
    run, state_root = finished_run
    states = {}
    for site in SITES:
        saved = SiteState(site_state_dir(CONFIG.job_name, site, str(state_root))).load()
        assert saved is not None, f"{site}: no site state"
        state, completed_round = saved
        assert completed_round == CONFIG.rounds - 1
        assert state and all(".local." in key for key in state)
        states[site] = state
    local_b = [key for key in states["siemens"] if ".lora_B." in key]
    assert any(torch.count_nonzero(states["siemens"][key]) > 0 for key in local_b)
    assert any(not torch.equal(states["siemens"][key], states["ge"][key]) for key in local_b)


def test_each_site_scores_personalised_and_global_only(finished_run, prepared_root):
    run, _ = finished_run
    with (prepared_root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        test_labels = {
            row["subject_id"]: (row["client"], int(row["label"]))
            for row in csv.DictReader(handle)
            if row["split"] == "test"
        }
    for site in SITES:
        report = run.test_metrics(site)
        assert report["site"] == site and report["n_test"] > 0
        assert set(report["models"]) == {"personalised", "global_only"}
        for scores in report["models"].values():
            for name in ("bal_acc", "sensitivity", "specificity"):
                assert math.isnan(scores[name]) or 0.0 <= scores[name] <= 1.0
        site_subjects = {subject for subject, (client, _) in test_labels.items() if client == site}
        assert set(report["predictions"]) == set(report["models"])
        for predictions in report["predictions"].values():
            assert sorted(entry["subject_id"] for entry in predictions) == sorted(site_subjects)
            for entry in predictions:
                assert entry["label"] == test_labels[entry["subject_id"]][1] and 0.0 <= entry["p_diseased"] <= 1.0


def test_bytes_are_accounted_per_site_and_round(finished_run):
    run, _ = finished_run
    up = run.comm_records("up")
    assert sorted((r["round"], r["site"]) for r in up) == sorted((r, s) for r in range(CONFIG.rounds) for s in SITES)
    for record in up:
        assert record["tensor_bytes"] > 0
        assert record["payload_bytes"] >= record["tensor_bytes"]
        assert record["full_model_bytes"] > 10 * record["tensor_bytes"]
    assert len(run.comm_records("down")) == CONFIG.rounds * len(SITES)


def test_tensorboard_has_one_byte_curve_per_site_and_no_curve_about_too_few_subjects(finished_run):
    """The test cohort holds fewer than 5 validation subjects a site: no validation curve may leave a site (the
    curves of a larger cohort: test_federation_learns.py)."""
    run, _ = finished_run
    tb_root = run.server_dir / "tb_events"
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(tb_root))
    multiplexer.Reload()
    for site in SITES:
        tags = multiplexer.GetAccumulator(site).Tags()["scalars"]
        assert "comm/up_payload_bytes" in tags and "val_bal_acc" not in tags
        assert "validation subjects; no curve sent" in run.log(site)


def test_a_restarted_server_resumes_and_loses_nothing(finished_run, restarted_run):
    """Global and local adapters both survive: the interrupted run ends exactly where the uninterrupted one does."""
    uninterrupted, uninterrupted_state = finished_run
    first, saved, second, state_root = restarted_run
    assert first.problems() == [] and second.problems() == []
    shipped = torch.load(second.server_dir / "app_server" / "custom" / INITIAL_CHECKPOINT, weights_only=True)
    first_global = first.global_model()
    assert shipped.keys() == first_global.keys()
    assert all(torch.equal(shipped[key], first_global[key]) for key in shipped), "the global adapter was lost"
    assert "Round 1 started." in second.log() and "Round 0 started." not in second.log()
    reference = uninterrupted.global_model()
    assert all(torch.equal(second.global_model()[key], reference[key]) for key in reference)
    for site in SITES:
        assert saved[site] is not None and saved[site][1] == 0
        assert "resuming from the private state saved at round 0" in second.log(site)
        resumed_state, _ = SiteState(site_state_dir(CONFIG.job_name, site, str(state_root))).load()
        straight_state, _ = SiteState(site_state_dir(CONFIG.job_name, site, str(uninterrupted_state))).load()
        assert all(torch.equal(resumed_state[key], straight_state[key]) for key in straight_state), site
        resumed_scores, straight_scores = second.test_metrics(site), uninterrupted.test_metrics(site)
        assert json.dumps(resumed_scores, sort_keys=True) == json.dumps(straight_scores, sort_keys=True)
