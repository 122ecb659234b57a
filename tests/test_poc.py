"""End to end on a real NVFlare POC network on loopback: provision, start, submit, wait, download, stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from custom.site_state import SiteState
from jobs.poc import PocNetwork, run_jobs
from jobs.privacy import site_privacy_policy
from jobs.recipe import FederationConfig, export_job
from models.protocol import SITES

pytestmark = pytest.mark.slow

CONFIG = FederationConfig.for_method(rounds=2, local_epochs=1)


@pytest.fixture(scope="module")
def poc_results(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """Two jobs on one POC network whose sites carry their own privacy scope: the normal job, and the same job with
    its result filter taken out of the client config (what a careless or hostile coordinator could submit)."""
    root = tmp_path_factory.mktemp("poc")
    job_dir = export_job(CONFIG, root / "jobs")
    unfiltered = export_job(CONFIG.replace(rounds=1, name="unfiltered"), root / "unfiltered")
    client_config = unfiltered / "app" / "config" / "config_fed_client.json"
    config = json.loads(client_config.read_text())
    config["task_result_filters"] = []
    client_config.write_text(json.dumps(config, indent=4))
    results = run_jobs([job_dir, unfiltered], root / "ws", str(prepared_root), timeout=600, site_policy=CONFIG.policy)
    return results, root / "ws"


@pytest.fixture(scope="module")
def poc_result(poc_results) -> tuple[dict, Path]:
    results, workspace = poc_results
    return results[0], workspace


def test_a_site_scope_keeps_local_keys_home_when_the_job_has_no_filter(poc_results):
    """The site's own privacy scope (local/privacy.json) filters every result: the server still receives no local
    key, accepts the updates, and the run completes (without the scope, test_privacy.py shows every update
    rejected and the run failing)."""
    results, workspace = poc_results
    unfiltered = results[1]
    assert unfiltered["status"] == "FINISHED:COMPLETED"
    server = Path(unfiltered["server"])
    received = [json.loads(line) for line in (server / "received_keys.jsonl").read_text().splitlines()]
    assert len(received) == len(SITES)
    for record in received:
        assert record["rejected"] == "" and record["not_shared"] == [], record["site"]
        assert not any(".local." in key for key in record["keys"]), record["site"]
    for site in SITES:
        scope = json.loads(
            (workspace / "poc" / "med_duallora_poc" / "prod_00" / site / "local" / "privacy.json").read_text()
        )
        assert scope == site_privacy_policy(CONFIG.policy)


def test_the_job_completes_and_results_come_back(poc_result):
    result, _ = poc_result
    assert result["status"] == "FINISHED:COMPLETED"
    server = Path(result["server"])
    saved = torch.load(server / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=True)
    policy = CONFIG.policy
    assert saved["model"] and all(policy.is_shared(key) for key in saved["model"])
    received = [json.loads(line) for line in (server / "received_keys.jsonl").read_text().splitlines()]
    assert len(received) == CONFIG.rounds * len(SITES) and not any(r["not_shared"] for r in received)
    assert {p.name for p in (server / "tb_events").iterdir()} == set(SITES)
    for site, run_dir in result["sites"].items():
        report = json.loads((Path(run_dir) / "test_metrics.json").read_text())
        assert report["site"] == site and set(report["models"]) == {"personalised", "global_only"}
        state_dir = Path(run_dir).parent / "med_duallora_state" / CONFIG.job_name / site
        assert SiteState(str(state_dir)).saved_rounds() == list(range(CONFIG.rounds))


def test_the_network_was_loopback_only_and_sandboxed(poc_result):
    result, workspace = poc_result
    network = PocNetwork(workspace, port=result["port"])
    server_config = json.loads((network.prod_dir / "127.0.0.1" / "startup" / "fed_server.json").read_text())
    assert server_config["servers"][0]["service"]["target"] == f"127.0.0.1:{result['port']}"
    assert result["port"] not in (8002, 8003)
    assert (workspace / "home" / ".nvflare" / "config.conf").is_file()


def test_every_process_it_started_is_gone(poc_result):
    result, workspace = poc_result
    assert PocNetwork(workspace, port=result["port"]).running_pids() == []
