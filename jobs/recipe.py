"""The federated job of a sharing policy, built with NVFlare's Recipe API and exported as a job folder."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.client.config import ExchangeFormat
from nvflare.recipe import add_experiment_tracking

from app.site_config import SITE_CONFIG_FILE, SiteConfig
from custom.aggregators import DEFAULT_MAX_SAMPLES_PER_SITE, SharedKeyAggregator
from custom.codec import CODECS, CompressWeights, DecompressWeights
from custom.comm import PayloadMeter
from custom.controller import REPLICA_CHECKPOINT
from custom.filters import SharedKeysOnly
from jobs.flare_private import PolicyFedAvgRecipe, ship_packages
from jobs.site_installed import make_site_installed
from models import loading
from models.atomic_io import torch_save_atomic, write_text_atomic
from models.policy import SharingPolicy
from models.protocol import SITES, WEIGHTS_ENV
from models.standin import RANDOM, STANDIN

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "data_prep", "custom", "app")
"""What a site and the server import: the packages below `jobs` (the import-direction test keeps it so)."""
CLIENT_SCRIPT = "client.py"
CLIENT_LAUNCHER = f'''"""Site script NVFlare runs: med-duallora's `app.client` (installed, or shipped in custom/),
reading the job's {SITE_CONFIG_FILE} beside this file."""

from app.client import main

main()
'''
INITIAL_CHECKPOINT = "ckpt/init_global_adapters.pt"
BYOC_DIR = "byoc"
TRAIN_TASK = "train"
WEIGHT_TASKS = [TRAIN_TASK, "validate"]
TASK_REQUEST_INTERVAL_S = 0.5  # how soon a site asks again when no task is ready (NVFlare's default: 2 s)
TRACKING_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""The server's experiment tracking choices (NVFlare's receivers) and the package each needs: on the server, which
runs the receiver, and where the job is exported (NVFlare builds the receiver there)."""


class TrackingUnavailable(RuntimeError):
    """The chosen experiment tracking's package is not installed where the job is exported."""


@dataclass
class FederationConfig:
    """A federated run of one method: the sites' configuration (its policy built once) and the federation's own
    settings. The defaults are the committed CPU demo job (the stand-in backbone)."""

    site: SiteConfig = field(default_factory=SiteConfig)
    rounds: int = 5
    min_clients: int = 3
    sites: tuple[str, ...] = SITES
    start_round: int = 0
    resume_from: str | None = None
    """FL_global_model.pt of the run being resumed (with `start_round`)."""
    name: str | None = None
    max_samples_per_site: int = DEFAULT_MAX_SAMPLES_PER_SITE
    """The largest training-sample count a site may claim; an update claiming more is rejected, not clipped."""
    clip_update_norm: float | None = None
    """Robust aggregation: each site's update is scaled down to this L2 norm when longer (None = off)."""
    compression: str | None = None
    """Compressed transport of the training rounds' weights, both ways (custom.codec): `fp16`, `int8` (blockwise),
    or None (fp32). The final model goes to the sites for evaluation uncompressed, so the model each site tests is
    exactly the one the server exports."""
    secure_aggregation: bool = False
    """Homomorphic encryption of the shared keys (custom.secure_aggregation): each site encrypts its update with the
    CKKS context provisioned into its startup kit, the server sums ciphertexts, only the sites decrypt. POC and
    production only (the simulator has no provisioned contexts); needs `tenseal` (the `he` extra) everywhere."""
    round_timeout_s: int = 3600
    """A round (and each final evaluation stage) ends after this many seconds, with whoever answered: a hung site
    cannot stall the federation for longer."""
    straggler_wait_s: int = 600
    """Once `min_clients` sites answered, how long a round still waits for the others."""
    process_per_round: bool = False
    """Each task runs in a fresh site process (NVFlare's external process, launched per task): a site whose
    process dies (the OOM killer, a SIGKILL) misses that round only and rejoins the next with its saved local
    state. Costs one interpreter start-up per round; `python3` on the site's PATH must have med-duallora."""
    replica_seeds: tuple[int, ...] = ()
    """Run one independent federation per seed, one after another in the same site processes (NVFlare's start-up is
    paid once): the benchmark's several seeds in one simulator job. Empty: one run, with the site's seed."""
    tracking: str = "tensorboard"
    """The server's experiment tracking (TRACKING_PACKAGES): TensorBoard event files in `<server run>/tb_events/`,
    or MLflow (a SQLite store, `mlflow.db`, in the server's job result folder). Byte accounting (custom.comm) writes
    TensorBoard files either way."""

    def __post_init__(self) -> None:
        if self.site.dp_epsilon and self.site.dp_rounds != self.rounds:
            self.site = self.site.replace(dp_rounds=self.rounds)  # the DP budget spans the job's rounds
        if self.compression is not None and self.compression not in CODECS:
            raise ValueError(f"compression {self.compression!r}: choose one of {list(CODECS)} or None")
        if self.secure_aggregation:
            conflicts = {
                "compression": self.compression,
                "clip_update_norm (norms of ciphertexts cannot be taken)": self.clip_update_norm,
                "resume_from (the persisted global model is encrypted)": self.resume_from,
                "a policy that shares nothing": not self.policy.shared_parts,
            }
            named = [name for name, value in conflicts.items() if value]
            if named:
                raise ValueError(f"secure aggregation cannot be combined with {', '.join(named)}")
        if self.tracking not in TRACKING_PACKAGES:
            raise ValueError(f"tracking {self.tracking!r}: choose one of {sorted(TRACKING_PACKAGES)}")
        if self.replica_seeds and (self.resume_from or self.start_round):
            raise ValueError("a job of several replicas cannot resume an earlier run (resume_from, start_round)")
        if len(set(self.replica_seeds)) != len(self.replica_seeds):
            raise ValueError(f"replica_seeds {list(self.replica_seeds)} repeat a seed")

    @classmethod
    def for_method(
        cls,
        method: str = "med_duallora",
        share_head: bool | None = None,
        *,
        rounds: int = 5,
        min_clients: int = 3,
        sites: tuple[str, ...] = SITES,
        start_round: int = 0,
        resume_from: str | None = None,
        name: str | None = None,
        max_samples_per_site: int = DEFAULT_MAX_SAMPLES_PER_SITE,
        clip_update_norm: float | None = None,
        compression: str | None = None,
        secure_aggregation: bool = False,
        round_timeout_s: int = 3600,
        straggler_wait_s: int = 600,
        process_per_round: bool = False,
        replica_seeds: tuple[int, ...] = (),
        tracking: str = "tensorboard",
        **site_settings: Any,
    ) -> FederationConfig:
        """The run of `method`; `site_settings` are SiteConfig fields (local_epochs, weights, adapter, ...)."""
        return cls(
            site=SiteConfig.for_method(method, share_head, **site_settings),
            rounds=rounds,
            min_clients=min_clients,
            sites=tuple(sites),
            start_round=start_round,
            resume_from=resume_from,
            name=name,
            max_samples_per_site=max_samples_per_site,
            clip_update_norm=clip_update_norm,
            compression=compression,
            secure_aggregation=secure_aggregation,
            round_timeout_s=round_timeout_s,
            straggler_wait_s=straggler_wait_s,
            process_per_round=process_per_round,
            replica_seeds=tuple(replica_seeds),
            tracking=tracking,
        )

    @property
    def policy(self) -> SharingPolicy:
        return self.site.policy

    @property
    def job_name(self) -> str:
        return self.name or self.policy.name

    @property
    def site_config(self) -> SiteConfig:
        """The configuration every site receives (its run name is the job name)."""
        return self.site.replace(run_name=self.job_name)

    def replace(self, **changes: Any) -> FederationConfig:
        """A copy with `changes` to the federation's fields or to the site's (SiteConfig fields)."""
        site_fields = {item.name for item in dataclasses.fields(SiteConfig)}
        site_changes = {key: value for key, value in changes.items() if key in site_fields}
        own = {key: value for key, value in changes.items() if key not in site_fields}
        if site_changes:
            own["site"] = self.site.replace(**site_changes)
        return dataclasses.replace(self, **own)


REAL_ROUNDS = 20
"""Rounds of the real job: tens of rounds of a few local epochs (CineMA's federated fine-tuning, reference notes)."""
REAL_TRAINING: dict[str, Any] = {
    "local_epochs": 2,
    "batch_size": 4,
    "grad_ckpt": True,
    "num_workers": 2,
    "threads": 0,
}
"""The real job's training settings at each site, for CineMA-base on a GPU: CineMA's fine-tuning batch of 4,
activation checkpointing, loader workers for the augmentation, torch's own thread count (README "Real runs")."""


def real_site_settings(
    weights: str = f"${WEIGHTS_ENV}", cinema_config: str | None = None, backbone: str | None = None
) -> dict[str, Any]:
    """The sites' settings of the CineMA configuration: pretrained weights at every site (CineMA-base unless a
    config.yaml or `backbone` says otherwise) and REAL_TRAINING."""
    backbone = None if cinema_config else backbone or "base"
    return {"weights": weights, "cinema_config": cinema_config, "backbone": backbone, **REAL_TRAINING}


def real_config(
    weights: str = f"${WEIGHTS_ENV}", cinema_config: str | None = None, **changes: Any
) -> FederationConfig:
    """The CineMA configuration (`real_site_settings`, each round in a fresh site process) of a run; `changes` are
    FederationConfig.for_method's."""
    changes.setdefault("process_per_round", True)
    changes.setdefault("rounds", REAL_ROUNDS)
    return FederationConfig.for_method(**real_site_settings(weights, cinema_config), **changes)


def initial_global_state(config: FederationConfig) -> dict[str, torch.Tensor]:
    """The shared entries of a freshly built site model: what the server starts from (adapters and head only).

    Built exactly as a site builds its model. The adapters never depend on the backbone weights (A drawn per module
    from the adapter seed, B = 0), nor does the head of a pretrained CineMA (MAE) checkpoint, which carries none:
    the head is the seeded fresh one. Weights that are not here (`$MED_DUALLORA_WEIGHTS`, resolved at each site)
    are then replaced by a random backbone of the same shape, without the random-backbone alarm. Only a fine-tuned
    checkpoint (`cinema_config`) brings a head of its own: read where it exists, so that it is the starting head.
    """
    site, policy = config.site_config, config.policy
    if site.weights in (STANDIN, RANDOM) or os.path.isfile(os.path.expandvars(site.weights)):
        return site.build_module().shared_state_dict()
    if policy.full_blocks:
        raise FileNotFoundError(
            f"policy {policy.name} shares backbone blocks: its initial global model needs the weights, but "
            f"{site.weights!r} is not readable here; export where the pretrained weights are"
        )
    if policy.share_head and site.cinema_config:
        message = (
            f"{site.weights!r} is not readable here: the shared head starts from a fresh initialisation, not from "
            "the fine-tuned checkpoint's head; export where the weights are to start from it"
        )
        warnings.warn(message, stacklevel=2)
    else:
        shared = "adapters and head" if policy.share_head else "adapters"
        print(f"weights: {site.weights} is resolved at each site; the initial {shared} do not depend on it")
    with _random_backbone_scaffold():
        return site.replace(weights=RANDOM).build_module().shared_state_dict()


@contextlib.contextmanager
def _random_backbone_scaffold() -> Iterator[None]:
    """Silence models.loading's random-backbone alarm (warning and log record) while a random backbone serves only
    as the scaffold the initial adapters and head are built on."""

    def not_the_alarm(record: logging.LogRecord) -> bool:
        return loading.NO_WEIGHTS_MESSAGE not in record.getMessage()

    loading_logger = logging.getLogger(loading.__name__)
    loading_logger.addFilter(not_the_alarm)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape(loading.NO_WEIGHTS_MESSAGE))
            yield
    finally:
        loading_logger.removeFilter(not_the_alarm)


def resumed_global_state(config: FederationConfig) -> dict[str, torch.Tensor]:
    """The global model persisted by an earlier run (`FL_global_model.pt`); every key must be shared."""
    saved = torch.load(config.resume_from, map_location="cpu", weights_only=True)
    state = dict(saved.get("model", saved))
    outside = sorted(key for key in state if not config.policy.is_shared(key))
    if not state or outside:
        raise ValueError(
            f"{config.resume_from}: not a global model of policy {config.policy.name} (keys {outside[:3]})"
        )
    return state


def build_recipe(config: FederationConfig, train_script: str = CLIENT_SCRIPT) -> PolicyFedAvgRecipe:
    """The recipe: adapter-only server model, policy filter on every weight-carrying task, byte accounting.

    The filter and the aggregator receive the run's serialised policy, the sites the whole SiteConfig (the
    `site_config.json` the staging folder holds). FedProx is NVFlare's (the controller sends mu, the patched
    Lightning trainer applies it) when every trained key is shared; otherwise each site adds its own term over the
    shared keys (SiteConfig.site_proximal_mu). File paths (`train_script`, the initial checkpoint, the site
    configuration) are relative to the working directory; `staged_recipe` prepares them.
    """
    policy = config.policy.to_dict()
    shares_everything_trained = not config.policy.has_private_parts
    recipe = PolicyFedAvgRecipe(
        shares_nothing=not config.policy.shared_parts,
        start_round=config.start_round,
        round_timeout_s=config.round_timeout_s,
        straggler_wait_s=config.straggler_wait_s,
        model_spec=config.site.model_spec(),
        replica_seeds=config.replica_seeds,
        fedprox_mu=config.site.proximal_mu if shares_everything_trained and config.site.proximal_mu else None,
        name=config.job_name,
        min_clients=config.min_clients,
        num_rounds=config.rounds,
        train_script=train_script,
        train_args=f"--config {SITE_CONFIG_FILE}",
        launch_external_process=config.process_per_round,
        launch_once=not config.process_per_round,
        aggregator=build_aggregator(config),
        model_persistor=PTFileModelPersistor(
            source_ckpt_file_full_name=INITIAL_CHECKPOINT, allow_numpy_conversion=False, load_device="cpu"
        ),
        server_expected_format=ExchangeFormat.PYTORCH,
        key_metric="",
    )
    ship_packages(recipe, PACKAGES)
    recipe.add_client_file(SITE_CONFIG_FILE)
    recipe.add_server_config({"server": {"task_request_interval": TASK_REQUEST_INTERVAL_S}})
    recipe.add_server_file(INITIAL_CHECKPOINT)
    for seed in config.replica_seeds:
        recipe.add_server_file(REPLICA_CHECKPOINT.format(seed))
    recipe.add_client_output_filter(SharedKeysOnly(policy), tasks=WEIGHT_TASKS)
    # Filters run in the order added: the codec packs after SharedKeysOnly and before the downlink meter, and
    # unpacks after the uplink meter, so that both meters count the bytes on the wire.
    if config.compression:
        # on the validate task's results too (NVFlare wants one task set per chain): they carry metrics only
        recipe.add_client_output_filter(CompressWeights(config.compression), tasks=WEIGHT_TASKS)
        recipe.add_server_output_filter(CompressWeights(config.compression), tasks=[TRAIN_TASK])
        recipe.add_client_input_filter(DecompressWeights(), tasks=[TRAIN_TASK])
    if config.secure_aggregation:
        from custom.secure_aggregation import DecryptSharedWeights, EncryptSharedWeights  # tenseal: when asked for

        # on the validate task's results too (one task set per chain): they carry metrics, which it passes unchanged
        recipe.add_client_output_filter(EncryptSharedWeights(), tasks=WEIGHT_TASKS)
        recipe.add_client_input_filter(DecryptSharedWeights(), tasks=WEIGHT_TASKS)
    recipe.add_server_input_filter(PayloadMeter("up"), tasks=[TRAIN_TASK])
    recipe.add_server_output_filter(PayloadMeter("down"), tasks=[TRAIN_TASK])
    if config.compression:
        recipe.add_server_input_filter(DecompressWeights(), tasks=[TRAIN_TASK])
    add_experiment_tracking(recipe, config.tracking)
    return recipe


def build_aggregator(config: FederationConfig) -> SharedKeyAggregator:
    """The job's validated aggregator: on plaintext, or on ciphertexts under secure aggregation."""
    policy = config.policy.to_dict()
    bounds = {"min_updates": config.min_clients, "max_samples_per_site": config.max_samples_per_site}
    if config.secure_aggregation:
        from custom.secure_aggregation import EncryptedSharedKeyAggregator  # needs tenseal: only when asked for

        return EncryptedSharedKeyAggregator(policy, **bounds)
    return SharedKeyAggregator(policy, clip_update_norm=config.clip_update_norm, **bounds)


@contextlib.contextmanager
def staged_recipe(
    config: FederationConfig, byoc: bool = False, train_script: str | None = None
) -> Iterator[PolicyFedAvgRecipe]:
    """The recipe, built and used inside a staging folder holding every file the job ships.

    The folder holds `client.py` (a three-line launcher of `app.client`, or `train_script`), `site_config.json`
    (the sites' SiteConfig), the initial global checkpoint (fresh, or the global model of the run being resumed)
    and, with `byoc`, our packages. Without `byoc` the sites and the server import our packages from the installed
    `med-duallora`; with it they are shipped in the job's `custom/`.
    """
    with tempfile.TemporaryDirectory(prefix=f"{config.job_name}.") as stage:
        if train_script:
            shutil.copyfile(train_script, os.path.join(stage, CLIENT_SCRIPT))
        else:
            Path(stage, CLIENT_SCRIPT).write_text(CLIENT_LAUNCHER, encoding="utf-8")
        state = resumed_global_state(config) if config.resume_from else initial_global_state(config)
        torch_save_atomic(os.path.join(stage, INITIAL_CHECKPOINT), state)
        for seed in config.replica_seeds:
            replica_state = initial_global_state(config.replace(seed=seed))
            torch_save_atomic(os.path.join(stage, REPLICA_CHECKPOINT.format(seed)), replica_state)
        write_text_atomic(os.path.join(stage, SITE_CONFIG_FILE), config.site_config.to_json())
        with contextlib.chdir(stage):
            recipe = build_recipe(config)
            if byoc:
                skip = shutil.ignore_patterns("__pycache__")
                for package in PACKAGES:
                    shutil.copytree(REPO / package, Path(BYOC_DIR, package), ignore=skip)
                recipe.add_server_file(BYOC_DIR)
            yield recipe


def export_job(
    config: FederationConfig,
    out_dir: str | Path,
    byoc: bool = False,
    train_script: str | None = None,
    site_installed: bool = False,
) -> Path:
    """Write `<out_dir>/<job name>/`, replacing any earlier export atomically; returns its path.

    `site_installed`: the sites' app carries no code and runs the med-duallora each site installed
    (jobs.site_installed), for sites that allow custom code only from their own staff. TrackingUnavailable when
    the tracking's package is not installed here.
    """
    if site_installed and (byoc or train_script):
        raise ValueError("a site-installed job ships no code: it cannot take --byoc or a training script")
    require_tracking(config.tracking)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.job_name}.", dir=out_dir))
    try:
        with staged_recipe(config, byoc, train_script) as recipe:
            recipe.export(str(staging))
        for path in (staging / config.job_name).glob("*/config/*.json"):
            _sort_task_lists(path)
        if site_installed:
            make_site_installed(staging / config.job_name, config.sites, config.process_per_round, CLIENT_SCRIPT)
        target = out_dir / config.job_name
        retired = staging / "retired"
        if target.exists():
            os.replace(target, retired)
        os.replace(staging / config.job_name, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def require_tracking(tracking: str) -> None:
    """TrackingUnavailable (one line) unless the package of `tracking` is installed here."""
    package = TRACKING_PACKAGES[tracking]
    if importlib.util.find_spec(package) is None:
        raise TrackingUnavailable(
            f"--tracking {tracking} needs {package} on the FL server (its receiver runs there) and where the job is "
            f"exported, and it is not installed here: pip install {package}"
        )


def _sort_task_lists(config_file: Path) -> None:
    """Sort the `tasks` lists NVFlare writes in set order, so that an export is byte-for-byte reproducible."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for section in ("executors", "task_data_filters", "task_result_filters"):
        for entry in config.get(section, []):
            entry["tasks"] = sorted(entry["tasks"])
    config_file.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
