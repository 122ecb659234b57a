"""The federated job of a sharing policy, built with NVFlare's Recipe API and exported as a job folder."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat
from nvflare.recipe import add_experiment_tracking

from app.client import build_module, parse_args, policy_from_args
from custom.aggregators import SharedKeyAggregator
from custom.comm import PayloadMeter
from custom.controller import ResilientFedAvg
from custom.filters import SharedKeysOnly
from models.atomic_io import torch_save_atomic
from models.policy import SharingPolicy
from models.standin import RANDOM, STANDIN

REPO = Path(__file__).resolve().parent.parent
SITES = ("siemens", "philips", "ge", "canon")
PACKAGES = ("app", "custom", "data_prep", "models")
CLIENT_SCRIPT = "client.py"
CLIENT_LAUNCHER = '''"""Site script NVFlare runs: med-duallora's `app.client` (installed, or shipped in custom/)."""

from app.client import main

main()
'''
INITIAL_CHECKPOINT = "ckpt/init_global_adapters.pt"
BYOC_DIR = "byoc"
WEIGHT_TASKS = ["train", "validate"]
TASK_REQUEST_INTERVAL_S = 0.5  # how soon a site asks again when no task is ready (NVFlare's default: 2 s)


@dataclass
class FederationConfig:
    """Everything a federated run of one method depends on; the defaults are the CPU demo (micro ConvViT)."""

    method: str = "med_duallora"
    share_head: bool | None = None
    rounds: int = 5
    local_epochs: int = 20
    """Enough local work per round (about 8 s a round for the demo cohort on 2 CPU cores) that NVFlare's fixed
    cost (site processes starting, final evaluation, shutdown: about 20 s) does not dominate (bench/federation.py)."""
    weights: str = STANDIN
    """`standin` (the committed stand-in and its config), `random` (said loudly), or a site-local path."""
    cinema_config: str | None = None
    backbone: str | None = None
    """ConvViT preset for weights without a config.yaml (`random` or a bare checkpoint): micro, mini, base..."""
    blocks: list[int] | None = None
    global_r: int = 8
    local_r: int = 8
    lr: float = 1e-3
    batch_size: int = 2
    seed: int = 0
    threads: int = 1
    min_clients: int = 3
    proximal_mu: float = 0.0
    sites: tuple[str, ...] = SITES
    start_round: int = 0
    resume_from: str | None = None
    name: str | None = None

    @property
    def job_name(self) -> str:
        return self.name or self.method

    def client_args(self) -> str:
        """The arguments of `app/client.py`, as written into the job config."""
        share_head = {None: "default", True: "yes", False: "no"}[self.share_head]
        args = ["--run-name", self.job_name, "--policy", self.method, "--share-head", share_head]
        args += ["--weights", self.weights]
        if self.cinema_config:
            args += ["--cinema-config", self.cinema_config]
        if self.backbone:
            args += ["--backbone", self.backbone]
        args += ["--global-r", str(self.global_r), "--local-r", str(self.local_r)]
        args += ["--lr", str(self.lr), "--local-epochs", str(self.local_epochs), "--batch-size", str(self.batch_size)]
        args += ["--seed", str(self.seed), "--threads", str(self.threads)]
        if self.blocks:
            args += ["--blocks", ",".join(str(b) for b in self.blocks)]
        if self.proximal_mu:
            args += ["--proximal-mu", str(self.proximal_mu)]
        return shlex.join(args)

    def replace(self, **changes) -> FederationConfig:
        return dataclasses.replace(self, **changes)


def real_config(
    weights: str = "$MED_DUALLORA_WEIGHTS", cinema_config: str | None = None, **changes
) -> FederationConfig:
    """The CineMA configuration: pretrained weights at every site (CineMA-base unless a config.yaml says otherwise),
    torch's own thread count."""
    backbone = None if cinema_config else "base"
    return FederationConfig(backbone=backbone, weights=weights, cinema_config=cinema_config, threads=0, **changes)


def site_arguments(config: FederationConfig) -> argparse.Namespace:
    """The client script's parsed arguments, exactly as a site sees them."""
    return parse_args(shlex.split(config.client_args()))


def site_policy(config: FederationConfig) -> SharingPolicy:
    """The sharing policy as the site model resolves it (for `fedavg_full`, the blocks it fine-tunes)."""
    return policy_from_args(site_arguments(config))


def sharing_args(config: FederationConfig) -> dict:
    """The arguments of the filter and the aggregator: policy name, head sharing, fully tuned blocks."""
    policy = site_policy(config)
    return {"policy": policy.name, "share_head": policy.share_head, "full_blocks": list(policy.full_blocks) or None}


def initial_global_state(config: FederationConfig) -> dict[str, torch.Tensor]:
    """The shared entries of a freshly built site model: what the server starts from (adapters and head only).

    Built exactly as a site builds its model. The backbone weights are only read when they exist here, so that
    a fine-tuned checkpoint's head is the starting head; the adapters never depend on them.
    """
    args = site_arguments(config)
    if args.weights not in (STANDIN, RANDOM) and not os.path.isfile(os.path.expandvars(args.weights)):
        policy = site_policy(config)
        if policy.full_blocks:
            raise FileNotFoundError(
                f"policy {policy.name} shares backbone blocks: its initial global model needs the weights, but "
                f"{args.weights!r} is not readable here; export where the pretrained weights are"
            )
        if policy.share_head:
            message = f"{args.weights!r} is not readable here: the shared head starts from a fresh initialisation"
            warnings.warn(message, stacklevel=2)
        args.weights = RANDOM
    return build_module(args).shared_state_dict()


def resumed_global_state(config: FederationConfig) -> dict[str, torch.Tensor]:
    """The global model persisted by an earlier run (`FL_global_model.pt`); every key must be shared."""
    saved = torch.load(config.resume_from, map_location="cpu", weights_only=True)
    state = dict(saved.get("model", saved))
    policy = site_policy(config)
    outside = sorted(key for key in state if not policy.is_shared(key))
    if not state or outside:
        raise ValueError(f"{config.resume_from}: not a global model of policy {policy.name} (keys {outside[:3]})")
    return state


class PolicyFedAvgRecipe(FedAvgRecipe):
    """FedAvgRecipe whose server workflow is `ResilientFedAvg` (all sites each round, failures tolerated)."""

    def __init__(self, *, start_round: int = 0, shares_nothing: bool = False, **kwargs):
        self._start_round = start_round
        self._shares_nothing = shares_nothing
        super().__init__(**kwargs)

    def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> ResilientFedAvg:
        return ResilientFedAvg(
            num_clients=self.min_clients,
            num_rounds=self.num_rounds,
            start_round=self._start_round,
            persistor_id=persistor_id,
            model=model_params,
            aggregator=model_aggregator,
            task_name="train",
            min_responses=self.min_clients,
            allow_empty_global_weights=self._shares_nothing,
        )


def build_recipe(config: FederationConfig, train_script: str = CLIENT_SCRIPT) -> PolicyFedAvgRecipe:
    """The recipe: adapter-only server model, policy filter on every weight-carrying task, byte accounting.

    File paths (`train_script`, the initial checkpoint) are relative to the working directory; `staged_recipe`
    prepares them.
    """
    sharing = sharing_args(config)
    recipe = PolicyFedAvgRecipe(
        shares_nothing=not site_policy(config).shared_parts,
        name=config.job_name,
        min_clients=config.min_clients,
        num_rounds=config.rounds,
        start_round=config.start_round,
        train_script=train_script,
        train_args=config.client_args(),
        aggregator=SharedKeyAggregator(**sharing),
        model_persistor=PTFileModelPersistor(
            source_ckpt_file_full_name=INITIAL_CHECKPOINT, allow_numpy_conversion=False, load_device="cpu"
        ),
        server_expected_format=ExchangeFormat.PYTORCH,
        key_metric="",
    )
    recipe._job.set_app_packages(list(PACKAGES))
    recipe.add_server_config({"server": {"task_request_interval": TASK_REQUEST_INTERVAL_S}})
    recipe.add_server_file(INITIAL_CHECKPOINT)
    recipe.add_client_output_filter(SharedKeysOnly(**sharing), tasks=WEIGHT_TASKS)
    recipe.add_server_input_filter(PayloadMeter("up"), tasks=["train"])
    recipe.add_server_output_filter(PayloadMeter("down"), tasks=["train"])
    add_experiment_tracking(recipe, "tensorboard")
    return recipe


@contextlib.contextmanager
def staged_recipe(
    config: FederationConfig, byoc: bool = False, train_script: str | None = None
) -> Iterator[PolicyFedAvgRecipe]:
    """The recipe, built and used inside a staging folder holding every file the job ships.

    The folder holds `client.py` (a three-line launcher of `app.client`, or `train_script`), the initial global
    checkpoint (fresh, or the global model of the run being resumed) and, with `byoc`, our packages. Without
    `byoc` the sites and the server import our packages from the installed `med-duallora`; with it they are
    shipped in the job's `custom/`.
    """
    with tempfile.TemporaryDirectory(prefix=f"{config.job_name}.") as stage:
        if train_script:
            shutil.copyfile(train_script, os.path.join(stage, CLIENT_SCRIPT))
        else:
            Path(stage, CLIENT_SCRIPT).write_text(CLIENT_LAUNCHER, encoding="utf-8")
        state = resumed_global_state(config) if config.resume_from else initial_global_state(config)
        torch_save_atomic(os.path.join(stage, INITIAL_CHECKPOINT), state)
        with contextlib.chdir(stage):
            recipe = build_recipe(config)
            if byoc:
                skip = shutil.ignore_patterns("__pycache__")
                for package in PACKAGES:
                    shutil.copytree(REPO / package, Path(BYOC_DIR, package), ignore=skip)
                recipe.add_server_file(BYOC_DIR)
            yield recipe


def export_job(
    config: FederationConfig, out_dir: str | Path, byoc: bool = False, train_script: str | None = None
) -> Path:
    """Write `<out_dir>/<job name>/`, replacing any earlier export atomically; returns its path."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.job_name}.", dir=out_dir))
    try:
        with staged_recipe(config, byoc, train_script) as recipe:
            recipe.export(str(staging))
        for path in (staging / config.job_name).glob("*/config/*.json"):
            _sort_task_lists(path)
        target = out_dir / config.job_name
        retired = staging / "retired"
        if target.exists():
            os.replace(target, retired)
        os.replace(staging / config.job_name, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sort_task_lists(config_file: Path) -> None:
    """Sort the `tasks` lists NVFlare writes in set order, so that an export is byte-for-byte reproducible."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for section in ("executors", "task_data_filters", "task_result_filters"):
        for entry in config.get(section, []):
            entry["tasks"] = sorted(entry["tasks"])
    config_file.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
