"""Privacy, checked on what the server actually received: no local key ever arrives, even when a site tries."""

from __future__ import annotations

import json
import re

import pytest

from jobs.recipe import FederationConfig, export_job, initial_global_state
from jobs.simulate import SimulatorRun
from models.protocol import SITES

pytestmark = pytest.mark.slow

CONFIG = FederationConfig.for_method(rounds=2, local_epochs=1, min_clients=4)
INJECTED = ("model.site_statistics.mean", "model.base_model.model.encoder.blocks.3.attn.q.lora_A.local_copy.weight")

# The real site script, patched so that `philips` tries to send two extra private entries, and its local adapter,
# subject rows and text in the metadata and the metrics, on top of the whole state dict (local adapter included)
# that the Lightning callback already sends.
LEAKY_CLIENT = f"""
import torch
import nvflare.app_opt.lightning.api as lightning_api
import nvflare.client as flare
from app.client import main

_send = lightning_api.send


def leaky_send(model, *args, **kwargs):
    if flare.get_site_name() == "philips" and model.params:
        for key in {INJECTED!r}:
            model.params[key] = torch.ones(2, 2)
        local_a = next(value for key, value in model.params.items() if ".lora_A.local." in key)
        model.meta["smuggled"] = torch.ones(2)
        model.meta["smuggled_list"] = local_a.tolist()
        model.meta["smuggled_bytes"] = local_a.numpy().tobytes()
        model.meta["note"] = "patient001 p=0.93"
        model.metrics = dict(model.metrics or {{}}, rows=[{{"subject_id": "patient001", "p_diseased": 0.93}}])
    return _send(model, *args, **kwargs)


lightning_api.send = leaky_send
main()
"""


@pytest.fixture(scope="module")
def leaky_run(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> SimulatorRun:
    root = tmp_path_factory.mktemp("leaky")
    script = root / "leaky_client.py"
    script.write_text(LEAKY_CLIENT)
    return simulate_sites(export_job(CONFIG, root / "jobs", train_script=str(script)), root)


@pytest.fixture(scope="module")
def unfiltered_run(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> SimulatorRun:
    """The normal job with the result filter taken out of its client config."""
    root = tmp_path_factory.mktemp("unfiltered")
    job_dir = export_job(CONFIG.replace(rounds=1), root / "jobs")
    client_config = job_dir / "app" / "config" / "config_fed_client.json"
    config = json.loads(client_config.read_text())
    config["task_result_filters"] = []
    client_config.write_text(json.dumps(config, indent=4))
    return simulate_sites(job_dir, root)


def test_not_one_local_key_reaches_the_server(leaky_run):
    assert leaky_run.problems() == []
    received = leaky_run.received_keys()
    assert sorted((r["round"], r["site"]) for r in received) == sorted(
        (r, s) for r in range(CONFIG.rounds) for s in SITES
    )
    shared = set(initial_global_state(CONFIG))
    for record in received:
        assert set(record["keys"]) == shared, f"{record['site']} round {record['round']}"
        assert record["not_shared"] == []
        assert not any(".local" in key or key in INJECTED for key in record["keys"])


SITE_META = {"NUM_STEPS_CURRENT_ROUND", "full_model_bytes", "initial_metrics", "num_train_samples"}
"""What a site's training result may carry besides the shared keys (custom.filters.RESULT_META_KEYS)."""
ADDED_AFTER_THE_SITE = {"filter_history", "client_name", "props"}
"""NVFlare's own: the filters applied (DXOFilter), and what the server attaches (the site's name, the task's props)."""


def test_no_undeclared_metadata_reaches_the_server(leaky_run):
    """On what the server received (its audit): only the declared metadata, from the leaking site too."""
    for record in leaky_run.received_keys():
        assert set(record["meta_keys"]) == SITE_META | ADDED_AFTER_THE_SITE, record["site"]
        assert not {"rows"} & set(record["metric_keys"]), record["site"]
    log = leaky_run.log("philips")
    assert "meta.smuggled_list" in log and "meta.note" in log  # dropped and counted at the site


def test_the_filter_stripped_what_the_patched_site_added(leaky_run):
    whole_state = CONFIG.site_config.build_module().state_dict()
    not_shared = len(whole_state) - len(initial_global_state(CONFIG))
    for site in SITES:
        counts = re.findall(r"kept (\d+) shared keys, stripped (\d+)", leaky_run.log(site))
        assert len(counts) == CONFIG.rounds, f"{site}: the filter did not report on every round"
        extra = len(INJECTED) if site == "philips" else 0
        assert {int(stripped) for _, stripped in counts} == {not_shared + extra}


def test_without_the_filter_the_server_rejects_and_the_run_reports_it(unfiltered_run):
    log = unfiltered_run.log()
    for site in SITES:
        assert f"rejected the contribution of {site}" in log
    assert "no acceptable contribution" in log
    assert "Finished FedAvg." not in log
    rejected = [r for r in unfiltered_run.received_keys() if r["not_shared"]]
    assert {r["site"] for r in rejected} == set(SITES)
    assert all(any(".local." in key for key in r["not_shared"]) for r in rejected)
    if unfiltered_run.global_model_path.is_file():
        policy = CONFIG.policy
        assert all(policy.is_shared(key) for key in unfiltered_run.global_model())
