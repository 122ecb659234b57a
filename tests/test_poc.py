"""End to end on a real NVFlare POC network on loopback: provision, start, submit, wait, download, stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.poc import PocNetwork, run_job
from jobs.recipe import SITES, FederationConfig, export_job

pytestmark = pytest.mark.slow

CONFIG = FederationConfig.for_method(rounds=2, local_epochs=1)


@pytest.fixture(scope="module")
def poc_result(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("poc")
    job_dir = export_job(CONFIG, root / "jobs")
    return run_job(job_dir, root / "ws", str(prepared_root), timeout=600), root / "ws"


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
        assert (Path(run_dir).parent / "med_duallora_state" / CONFIG.job_name / site / "private_state.pt").is_file()


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
