"""The exported job folders: the committed one is fresh, filters are declared by task name, nothing is baked in."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from nvflare.apis.app_validation import AppValidationKey
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.apis.workspace import Workspace
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.private.fed.app.default_app_validator import DefaultAppValidator
from nvflare.security.security import FLAuthorizer
from safetensors.torch import save_file

from app.site_config import SITE_CONFIG_FILE, SiteConfig
from jobs.job import config_from_args, parse_args
from jobs.job import main as job_main
from jobs.privacy import SITE_INSTALLED_CLASSES, SITE_ONLY, site_authorization, site_privacy_policy
from jobs.privacy import main as privacy_main
from jobs.recipe import INITIAL_CHECKPOINT, PACKAGES, REPO, FederationConfig, export_job
from jobs.site_installed import CLIENT_CONFIG, SITE_APP, SITE_EXECUTOR
from models.config import ConvViTConfig
from models.loading import NO_WEIGHTS_MESSAGE
from models.policy import POLICY_NAMES, get_policy
from models.protocol import SITES, WEIGHTS_ENV

COMMITTED = REPO / "jobs" / "med_duallora"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _configs(job: Path) -> tuple[dict, dict]:
    config_dir = job / "app" / "config"
    client = json.loads((config_dir / "config_fed_client.json").read_text())
    server = json.loads((config_dir / "config_fed_server.json").read_text())
    return client, server


@pytest.fixture(scope="module")
def fresh_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_job(FederationConfig.for_method(), tmp_path_factory.mktemp("export"))


def test_committed_job_equals_a_fresh_export(fresh_export):
    committed, fresh = _files(COMMITTED), _files(fresh_export)
    assert sorted(committed) == sorted(fresh), "file sets differ: run `python jobs/job.py export`"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"stale files {stale}: run `python jobs/job.py export`"


@pytest.mark.parametrize("method", [name for name in POLICY_NAMES if name != "med_duallora"])
def test_every_committed_method_job_equals_a_fresh_export(method, tmp_path):
    committed = REPO / "jobs" / method
    assert committed.is_dir(), (
        f"jobs/{method}/ is missing: run `python jobs/job.py export --method {method} --out jobs`"
    )
    fresh = export_job(FederationConfig.for_method(method), tmp_path)
    assert _files(committed) == _files(fresh), (
        f"jobs/{method}/ is stale: run `python jobs/job.py export --method {method}`"
    )


def test_export_from_the_command_line_is_byte_identical(fresh_export, tmp_path):
    subprocess.run([sys.executable, str(REPO / "jobs" / "job.py"), "export", "--out", str(tmp_path)], check=True)
    assert _files(tmp_path / "med_duallora") == _files(fresh_export)


def test_the_filter_is_declared_by_exact_task_names(fresh_export):
    client, _ = _configs(fresh_export)
    entries = client["task_result_filters"]
    declared = {task: [f["path"] for f in entry["filters"]] for entry in entries for task in entry["tasks"]}
    assert "*" not in declared
    for task in ("train", "validate"):
        assert declared.get(task) == ["custom.filters.SharedKeysOnly"], f"task {task} leaves unfiltered"


def test_the_server_is_adapter_only_and_tolerates_a_missing_site(fresh_export):
    _, server = _configs(fresh_export)
    components = {c["id"]: c for c in server["components"]}
    persistor = components["persistor"]["args"]
    assert persistor["source_ckpt_file_full_name"] == INITIAL_CHECKPOINT
    workflow = server["workflows"][0]
    assert workflow["path"] == "custom.controller.ResilientFedAvg"
    assert workflow["args"]["aggregator"]["path"] == "custom.aggregators.SharedKeyAggregator"
    assert workflow["args"]["min_responses"] == FederationConfig.min_clients < 4
    checkpoint = torch.load(fresh_export / "app" / "custom" / INITIAL_CHECKPOINT, weights_only=True)
    policy = FederationConfig.for_method().policy
    assert checkpoint and all(policy.is_shared(key) for key in checkpoint)


def test_the_job_is_small_and_bakes_in_no_path(fresh_export):
    files = _files(fresh_export)
    assert sum(len(data) for data in files.values()) < 100_000
    custom = sorted(name for name in files if name.startswith("app/custom/"))
    assert custom == ["app/custom/ckpt/init_global_adapters.pt", "app/custom/client.py", "app/custom/site_config.json"]
    text = "".join(data.decode() for name, data in files.items() if name.endswith(".json"))
    assert "site_config.json" in text  # the site script is told where its configuration is
    for fragment in (str(REPO), "/tmp", "/home", "MED_DUALLORA_DATA", "prepared"):
        assert fragment not in text
    meta = json.loads(files["meta.json"])
    assert meta["resource_spec"] == {} and meta["deploy_map"] == {"app": ["@ALL"]}


def test_byoc_ships_our_packages(tmp_path):
    job = export_job(FederationConfig.for_method(), tmp_path, byoc=True)
    for package in PACKAGES:
        assert (job / "app" / "custom" / package / "__init__.py").is_file()
    shipped = job / "app" / "custom" / "custom" / "filters.py"
    assert shipped.read_bytes() == (REPO / "custom" / "filters.py").read_bytes()
    assert not list(job.rglob("__pycache__"))


def test_parameters_reach_the_job(tmp_path):
    config = config_from_args(parse_args(["export", "--method", "fedsa_lora", "--rounds", "3", "--local-epochs", "4"]))
    job = export_job(config, tmp_path)
    client, server = _configs(job)
    assert job.name == "fedsa_lora"
    site = SiteConfig.read(job / "app" / "custom" / SITE_CONFIG_FILE)
    assert site.policy == get_policy("fedsa_lora") and site.local_epochs == 4 and site.run_name == "fedsa_lora"
    assert server["workflows"][0]["args"]["num_rounds"] == 3
    # The filter and the aggregator receive the same serialised policy object the sites do.
    filter_args = client["task_result_filters"][0]["filters"][0]["args"]
    aggregator_args = server["workflows"][0]["args"]["aggregator"]["args"]
    assert filter_args == {"policy": get_policy("fedsa_lora").to_dict()}
    assert aggregator_args == {"policy": get_policy("fedsa_lora").to_dict(), "min_updates": 3}


def test_the_real_configuration_is_cinema_base_with_site_weights(tmp_path):
    config = config_from_args(parse_args(["export", "--real"]))
    assert config.site.backbone == "base" and config.site.weights == "$MED_DUALLORA_WEIGHTS"
    assert config.process_per_round and not config_from_args(parse_args(["export"])).process_per_round
    job = export_job(config, tmp_path)
    site = SiteConfig.read(job / "app" / "custom" / SITE_CONFIG_FILE)
    assert (site.backbone, site.weights, site.threads) == ("base", "$MED_DUALLORA_WEIGHTS", 0)
    checkpoint = torch.load(job / "app" / "custom" / INITIAL_CHECKPOINT, weights_only=True)
    lora_a = [value for key, value in checkpoint.items() if ".lora_A.global." in key]
    assert lora_a and all(value.shape[1] == 768 for value in lora_a)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], {"rounds": 20, "local_epochs": 2, "batch_size": 4, "grad_ckpt": True, "precision": "auto"}),
        (
            ["--rounds", "3", "--local-epochs", "5", "--no-grad-ckpt"],
            {"rounds": 3, "local_epochs": 5, "grad_ckpt": False},
        ),
        (["--precision", "32-true", "--batch-size", "1"], {"precision": "32-true", "batch_size": 1}),
    ],
)
def test_the_real_job_has_real_training_defaults_that_options_override(extra, expected):
    """`--real` is not the demo's 5 rounds x 20 epochs; an option given on the command line still wins."""
    config = config_from_args(parse_args(["export", "--real", *extra]))
    found = {name: config.rounds if name == "rounds" else getattr(config.site, name) for name in expected}
    assert found == expected


def test_the_production_project_provisions_the_server_four_sites_and_admins(tmp_path):
    project = REPO / "jobs" / "production" / "project.yml"
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["nvflare", "provision", "-p", str(project), "-w", str(tmp_path)], check=True, env=env)
    prod = tmp_path / "med_duallora" / "prod_00"
    kits = {path.name for path in prod.iterdir()}
    assert set(SITES) <= kits
    assert "admin@coordinator.example.org" in kits
    servers = [name for name in kits - set(SITES) if "@" not in name]
    assert len(servers) == 1 and (prod / servers[0] / "startup" / "start.sh").is_file()
    participants = yaml.safe_load(project.read_text())["participants"]
    admin_orgs = {p["org"] for p in participants if p["type"] == "admin"}
    site_orgs = [p["org"] for p in participants if p["type"] == "client"]
    assert len(set(site_orgs)) == len(SITES) and not admin_orgs & set(site_orgs), "a site shares an admin's org"
    assert privacy_main(["--kit", str(prod / "ge")]) == 0
    local = prod / "ge" / "local"
    assert json.loads((local / "authorization.json").read_text()) == site_authorization()
    resources = json.loads((local / "resources.json").read_text())
    default = json.loads((local / "resources.json.default").read_text())
    assert resources["class_allow_list"][: len(default["class_allow_list"])] == default["class_allow_list"]
    assert set(SITE_INSTALLED_CLASSES) <= set(resources["class_allow_list"])
    # NVFlare's own check of a job's components at this site: our executor, not the general one, whose command the
    # job chooses (custom code in disguise).
    site = Workspace(root_dir=str(prod / "ge"), site_name="ge")
    assert site.get_resources_file_path() == str(local / "resources.json")
    authorizer = ComponentPathAuthorizer()
    # Every component a site-installed job builds at a site, compressed transport included, is allowed there.
    job = export_job(FederationConfig.for_method(compression="int8"), tmp_path / "jobs", site_installed=True)
    client = json.loads((job / SITE_APP / "config" / CLIENT_CONFIG).read_text())
    paths = {entry["executor"]["path"] for entry in client["executors"]}
    paths |= {
        item["path"]
        for kind in ("task_data_filters", "task_result_filters")
        for chain in client[kind]
        for item in chain["filters"]
    }
    assert {SITE_EXECUTOR, "custom.filters.SharedKeysOnly", "custom.codec.CompressWeights"} <= paths
    for allowed in paths:
        authorizer.authorize_component_config({"path": allowed, "args": {}}, workspace=site)
    general = "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor"
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):
        authorizer.authorize_component_config({"path": general, "args": {"command": "bash"}}, workspace=site)


@pytest.mark.parametrize(
    ("method", "controller_mu", "site_mu"),
    [
        ("fedit", 0.1, 0.0),  # every trained key is shared: NVFlare's FedProx (the controller sends mu)
        ("fedavg_full", 0.1, 0.0),
        ("med_duallora", None, 0.1),  # the local adapter trains too: the site's own term over the shared keys
        ("fedsa_lora", None, 0.1),
    ],
)
def test_fedprox_goes_to_nvflare_when_every_trained_key_is_shared(method, controller_mu, site_mu, tmp_path):
    config = config_from_args(parse_args(["export", "--method", method, "--proximal-mu", "0.1", "--out", "x"]))
    job = export_job(config, tmp_path)
    _, server = _configs(job)
    assert server["workflows"][0]["args"].get("fedprox_mu") == controller_mu
    assert SiteConfig.read(job / "app" / "custom" / SITE_CONFIG_FILE).site_proximal_mu == site_mu


def test_committed_jobs_have_no_fedprox(fresh_export):
    _, server = _configs(fresh_export)
    assert "fedprox_mu" not in server["workflows"][0]["args"]


def test_the_job_survives_the_config_rewrite_of_nvflare_job_submit(fresh_export, tmp_path):
    """`nvflare job submit` rewrites every JSON file of the app folders (NVFlare 2.9: a file whose first value is an
    object comes back as that object alone); the site configuration must come through it unchanged."""
    from nvflare.tool.job.config.configer import build_config_file_indices
    from nvflare.tool.job.job_cli import save_merged_configs

    job = tmp_path / "job"
    shutil.copytree(fresh_export, job)
    before = _files(job)
    save_merged_configs(build_config_file_indices(str(job), ["app"]), str(job), str(job))
    rewritten = SiteConfig.read(job / "app" / "custom" / SITE_CONFIG_FILE)
    assert rewritten == SiteConfig.read(fresh_export / "app" / "custom" / SITE_CONFIG_FILE)
    assert json.loads(_files(job)["app/custom/site_config.json"]) == json.loads(before["app/custom/site_config.json"])


def test_the_committed_site_privacy_scope_is_the_med_duallora_allowlist():
    """`jobs/production/privacy.json` is what each hospital copies into its startup kit's `local/` folder."""
    committed = json.loads((REPO / "jobs" / "production" / "privacy.json").read_text())
    assert committed == site_privacy_policy(get_policy("med_duallora")), "regenerate it with jobs.privacy"


@pytest.mark.parametrize("process_per_round", [False, True])
def test_a_site_installed_job_ships_no_code_to_the_sites(fresh_export, tmp_path, process_per_round):
    """NVFlare's own validator finds no custom code in the sites' app (the server's keeps its checkpoint), and the
    sites run the installed `app.client` with the same configuration and result filter as the shipped job."""
    config = FederationConfig.for_method(process_per_round=process_per_round)
    job = export_job(config, tmp_path, site_installed=True)
    files = _files(job)
    assert sorted(name for name in files if not name.startswith("app_server/config/")) == [
        "app_server/custom/ckpt/init_global_adapters.pt",
        f"{SITE_APP}/config/{CLIENT_CONFIG}",
        f"{SITE_APP}/config/{SITE_CONFIG_FILE}",
        "meta.json",
    ]
    assert json.loads(files["meta.json"])["deploy_map"] == {"app_server": ["server"], SITE_APP: list(SITES)}
    assert DefaultAppValidator("client").validate(str(job / SITE_APP)) == ("", {})
    assert DefaultAppValidator("server").validate(str(job / "app_server"))[1] == {AppValidationKey.BYOC: True}
    client = json.loads(files[f"{SITE_APP}/config/{CLIENT_CONFIG}"])
    arguments = client["executors"][0]["executor"]["args"]
    assert client["executors"][0]["executor"]["path"] == SITE_EXECUTOR
    assert arguments == {"launch_once": not process_per_round}
    shipped_client, _ = _configs(fresh_export)
    assert client["task_result_filters"] == shipped_client["task_result_filters"]
    installed_site = SiteConfig.read(job / SITE_APP / "config" / SITE_CONFIG_FILE)
    assert installed_site == SiteConfig.read(fresh_export / "app" / "custom" / SITE_CONFIG_FILE)


def test_a_site_installed_job_cannot_ship_code(tmp_path):
    with pytest.raises(ValueError, match="ships no code"):
        export_job(FederationConfig.for_method(), tmp_path, byoc=True, site_installed=True)


def test_the_committed_site_authorization_keeps_code_and_shell_to_the_site():
    """`jobs/production/authorization.json` (each hospital's `local/authorization.json`): no role outside the site's
    organisation may run custom code or shell commands there; NVFlare parses it."""
    committed = json.loads((REPO / "jobs" / "production" / "authorization.json").read_text())
    assert committed == site_authorization(), "regenerate it with jobs.privacy"
    FLAuthorizer("hospital_ge", committed)
    for role, rights in committed["permissions"].items():
        for right in ("byoc", "shell_commands"):
            assert rights.get(right, "none") in ("none", SITE_ONLY), (role, right)


def _receivers(job: Path) -> list[str]:
    _, server = _configs(job)
    return [component["path"] for component in server["components"] if component["id"] == "receiver"]


@pytest.fixture
def stub_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Stands in for MLflow (not installed here: about 80 MB of wheels) with the names NVFlare's receiver module
    imports; the exporter only builds the receiver's configuration, the server would run it."""
    stubs = {name: types.ModuleType(name) for name in ("mlflow", "mlflow.entities", "mlflow.tracking")}
    stubs["mlflow.tracking.client"] = types.ModuleType("mlflow.tracking.client")
    for name, module in stubs.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    stubs["mlflow.entities"].Metric = stubs["mlflow.entities"].Param = stubs["mlflow.entities"].RunTag = object
    stubs["mlflow.tracking.client"].MlflowClient = object
    yield
    sys.modules.pop("nvflare.app_opt.tracking.mlflow.mlflow_receiver", None)


@pytest.mark.parametrize(
    ("tracking", "receiver"),
    [
        ("tensorboard", "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver"),
        ("mlflow", "nvflare.app_opt.tracking.mlflow.mlflow_receiver.MLflowReceiver"),
    ],
)
def test_the_tracking_choice_names_the_servers_receiver(tracking, receiver, tmp_path, request):
    if tracking == "mlflow" and importlib.util.find_spec("mlflow") is None:
        request.getfixturevalue("stub_mlflow")
    config = config_from_args(parse_args(["export", "--tracking", tracking]))
    assert config.tracking == tracking
    assert _receivers(export_job(config, tmp_path)) == [receiver]


def test_the_default_tracking_is_tensorboard(fresh_export):
    assert FederationConfig().tracking == "tensorboard" == parse_args(["export"]).tracking
    assert _receivers(fresh_export) == ["nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver"]
    with pytest.raises(ValueError, match="tracking 'wandb'"):
        FederationConfig(tracking="wandb")


def test_mlflow_tracking_without_mlflow_fails_at_export_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed, whatever this environment has
    with pytest.raises(SystemExit) as failed:
        job_main(["export", "--tracking", "mlflow", "--out", str(tmp_path)])
    message = str(failed.value.code)
    assert message.startswith("error: --tracking mlflow needs mlflow on the FL server") and "\n" not in message
    assert message.endswith("pip install mlflow") and not list(tmp_path.iterdir())


def test_exporting_the_real_job_without_weights_says_what_is_true(tmp_path, monkeypatch, capsys, caplog):
    """The initial adapters and head need no backbone weights: no random-backbone alarm, one accurate line."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert job_main(["export", "--real", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    said = "\n".join([out, err, caplog.text, *(str(warning.message) for warning in caught)])
    assert NO_WEIGHTS_MESSAGE not in said and "not readable here" not in said
    expected = f"weights: ${WEIGHTS_ENV} is resolved at each site; the initial adapters and head do not depend on it"
    assert out.splitlines() == [expected, str(tmp_path / "med_duallora")]


def test_the_initial_checkpoint_is_the_same_with_or_without_pretrained_weights(tmp_path, monkeypatch):
    """A pretrained CineMA (MAE) checkpoint at hand or not: the same initial global adapters and head."""
    from test_loading import fake_mae_checkpoint

    weights = tmp_path / "cinema.safetensors"
    save_file(fake_mae_checkpoint(ConvViTConfig.preset("micro"), seed=1), weights)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    checkpoints = []
    for index, given in enumerate((str(weights), f"${WEIGHTS_ENV}")):
        job = export_job(FederationConfig.for_method(weights=given, backbone="micro"), tmp_path / f"export{index}")
        checkpoints.append(torch.load(job / "app" / "custom" / INITIAL_CHECKPOINT, weights_only=True))
    with_weights, without = checkpoints
    assert with_weights.keys() == without.keys() and any(".pred_head_dict." in key for key in without)
    assert all(torch.equal(with_weights[key], without[key]) for key in without)
