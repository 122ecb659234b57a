"""End to end on a real NVFlare POC network on loopback: provision, start, submit, wait, download, stop."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from custom.site_state import SiteState
from jobs.job import config_from_args, parse_args
from jobs.job import main as job_main
from jobs.poc import ADMIN, FAILED_TO_RUN, PocNetwork, PocRun
from jobs.privacy import site_authorization, site_privacy_policy
from jobs.recipe import FederationConfig, export_job
from jobs.site_installed import CLIENT_CONFIG, SITE_APP
from models.export import load_model
from models.protocol import AUDIT_FILE, COMM_DIR, DATA_ENV, NO_GLOBAL_MODEL_FILE, SITES

pytestmark = pytest.mark.slow

CONFIG = FederationConfig.for_method(rounds=2, local_epochs=1)
SITE_INSTALLED_JOB = ["--demo", "--site-installed", "--rounds", "2", "--local-epochs", "1"]
"""`CONFIG`, as `jobs/job.py submit` options."""
SITE_FILE = "local/privacy.json"
HE_ENCODING_ERROR = 1e-5
"""Bound on |decrypted - plain| of a global model at HEBuilder's defaults (tests/test_secure_aggregation.py: ~6e-8)."""
EVERY_KIT_FILE = "log.txt"
"""A file every participant's workspace holds, server and sites alike (NVFlare's `cat` takes only some extensions)."""


def _shell_cat(network: PocNetwork, target: str, file: str) -> str:
    try:
        return network.shell_cat(target, file)
    except Exception as error:  # the API raises on some refusals and returns text on others: both are answers
        return f"{type(error).__name__}: {error}"


@pytest.fixture(scope="module")
def poc_results(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One POC network whose sites carry their own privacy scope and authorization (custom code and shell commands
    for their own staff only). Three jobs: the site-installed job; the same job with its result filter taken out
    of the client config (what a careless or hostile coordinator could submit); the job carrying custom code.
    Then the coordinator's admin tries `cat` at a site and at the server."""
    root = tmp_path_factory.mktemp("poc")
    unfiltered = export_job(CONFIG.replace(rounds=1, name="unfiltered"), root / "unfiltered", site_installed=True)
    client_config = unfiltered / SITE_APP / "config" / CLIENT_CONFIG
    config = json.loads(client_config.read_text())
    config["task_result_filters"] = []
    client_config.write_text(json.dumps(config, indent=4))
    with_code = export_job(CONFIG.replace(rounds=1, name="with_code"), root / "with_code")
    env = {DATA_ENV: str(prepared_root)}
    network = PocNetwork(root / "ws", env=env, site_policy=CONFIG.policy, site_authorization=True)
    with network:
        submitted = io.StringIO()
        with contextlib.redirect_stdout(submitted):  # the command users run; it prints the job id
            kit = ["--startup-kit", str(network.prod_dir / ADMIN), "--username", ADMIN]
            assert job_main(["submit", *SITE_INSTALLED_JOB, *kit]) == 0
        results = {"installed": network.follow(submitted.getvalue().split()[-1], timeout=600)}
        results["unfiltered"] = network.run(unfiltered, timeout=600)
        results["with_code"] = network.run(with_code, timeout=300)
        results["server_log"] = network.server_log()
        results["shell"] = {target: _shell_cat(network, target, EVERY_KIT_FILE) for target in ("ge", "server")}
    results["listening"] = network.listening
    results["workspace"] = root / "ws"
    return results


@pytest.fixture(scope="module")
def poc_result(poc_results) -> tuple[dict, Path]:
    return poc_results["installed"], poc_results["workspace"]


def test_the_submitted_options_are_the_tested_configuration():
    assert config_from_args(parse_args(["submit", *SITE_INSTALLED_JOB])) == CONFIG


def test_a_site_scope_keeps_local_keys_home_when_the_job_has_no_filter(poc_results):
    """The site's own privacy scope (local/privacy.json) filters every result: the server still receives no local
    key, accepts the updates, and the run completes (without the scope, test_privacy.py shows every update
    rejected and the run failing)."""
    unfiltered, workspace = poc_results["unfiltered"], poc_results["workspace"]
    assert unfiltered["status"] == "FINISHED:COMPLETED"
    server = Path(unfiltered["server"])
    received = [json.loads(line) for line in (server / "received_keys.jsonl").read_text().splitlines()]
    assert len(received) == len(SITES)
    for record in received:
        assert record["rejected"] == "" and record["not_shared"] == [], record["site"]
        assert not any(".local." in key for key in record["keys"]), record["site"]
    for site in SITES:
        scope = json.loads((workspace / "poc" / "med_duallora_poc" / "prod_00" / site / SITE_FILE).read_text())
        assert scope == site_privacy_policy(CONFIG.policy)


def test_a_job_with_custom_code_from_the_coordinator_does_not_run_at_the_sites(poc_results):
    """The sites' authorization.json keeps custom code (BYOC) to their own staff: the coordinator's admin can run
    the site-installed job, not one that ships code."""
    refused = poc_results["with_code"]
    assert refused["status"] == FAILED_TO_RUN
    deployment = next(
        line
        for line in poc_results["server_log"].splitlines()
        if refused["job_id"] in line and "deploy failure" in line
    )
    assert "'server: OK'" in deployment
    for site, run_dir in refused["sites"].items():
        assert f"'{site}: NVFLARE_ERROR: BYOC not permitted'" in deployment, site
        assert not Path(run_dir).exists(), site


def test_shell_commands_at_a_site_are_for_its_own_staff(poc_results):
    """The coordinator's admin reads a file on the server (its own organisation) but not at a site."""
    shell = poc_results["shell"]
    assert " - INFO - " not in shell["ge"] and "not authorized" in shell["ge"].lower(), shell["ge"]
    assert " - INFO - " in shell["server"], shell["server"][:300]


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


def test_the_network_was_loopback_only_and_sandboxed(poc_results):
    """What listened while the jobs ran (sampled with psutil), not what the config says: loopback only, and the
    server on its provisioned non-default port."""
    result, workspace = poc_results["installed"], poc_results["workspace"]
    listening = poc_results["listening"]
    assert listening, "no listening socket was seen"
    assert {address for address, _ in listening} == {"127.0.0.1"}, listening
    assert result["port"] in {port for _, port in listening}
    assert result["port"] not in (8002, 8003)
    assert (workspace / "home" / ".nvflare" / "config.conf").is_file()


def test_every_process_it_started_is_gone(poc_result):
    result, workspace = poc_result
    assert PocNetwork(workspace, port=result["port"]).running_pids() == []


@pytest.fixture(scope="module")
def secure_poc_command(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, PocRun]:
    """`python jobs/job.py poc --site-installed --secure-aggregation`, the command users run, on a network of its
    own that the command provisions with CKKS contexts: the one-round job of the unfiltered run above, encrypted.
    Its exit status and its run (from the record the command prints)."""
    workspace = tmp_path_factory.mktemp("poc_command")
    command = ["poc", "--site-installed", "--secure-aggregation", "--rounds", "1", "--local-epochs", "1"]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv(DATA_ENV, str(prepared_root))
        status = job_main([*command, "--workspace", str(workspace)])
    lines = printed.getvalue().splitlines()
    record = json.loads("\n".join(lines[lines.index("{") :]))  # the command prints the run's record last
    return status, PocRun.of(record, workspace / "network")


def test_the_poc_command_runs_a_site_installed_job_on_locked_down_sites(secure_poc_command):
    status, run = secure_poc_command
    assert status == 0 and run.problems() == []
    local = run.workspace / "poc" / "med_duallora_poc" / "prod_00" / "ge" / "local"
    assert json.loads((local / "authorization.json").read_text()) == site_authorization()


def test_secure_aggregation_gives_the_plain_global_model_and_the_server_only_ciphertexts(
    poc_results, secure_poc_command
):
    """The same one-round job, with and without homomorphic encryption, on contexts from provisioning: each site's
    decrypted global adapter (in its exported personalised model) is the plain run's global model within the CKKS
    encoding error, while the server received, aggregated and kept only ciphertexts."""
    _, secure = secure_poc_command
    plain = poc_results["unfiltered"]
    assert plain["status"] == "FINISHED:COMPLETED" and secure.problems() == []
    plain_global = torch.load(Path(plain["server"]) / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    server = secure.server_dir
    kept = torch.load(secure.global_model_path, weights_only=True)["model"]
    assert set(kept) == set(plain_global) and all(isinstance(value, bytes) for value in kept.values())
    assert "homomorphic encryption" in (server / NO_GLOBAL_MODEL_FILE).read_text()
    received = [json.loads(line) for line in (server / AUDIT_FILE).read_text().splitlines()]
    assert len(received) == len(SITES) and all(record["rejected"] == "" for record in received)
    uplink = json.loads((server / COMM_DIR / "bytes_up.json").read_text())
    plain_uplink = json.loads((Path(plain["server"]) / COMM_DIR / "bytes_up.json").read_text())
    assert min(r["payload_bytes"] for r in uplink) > 10 * max(r["payload_bytes"] for r in plain_uplink)
    largest = 0.0
    for site in SITES:
        decrypted = load_model(secure.personalised_model_dir(site)).shared_state_dict()
        assert set(decrypted) == set(plain_global), site
        for key, value in plain_global.items():
            largest = max(largest, float((decrypted[key] - value).abs().max()))
    assert largest < HE_ENCODING_ERROR, largest
    assert any(float(value.abs().max()) > 100 * HE_ENCODING_ERROR for value in plain_global.values())
