"""Site training script run by NVFlare's Lightning Client API: validate personalised, train, send the shared part.

Each `train` round a site receives the global model (the keys its policy shares), validates its personalised model
(global + its own local adapter) and reports those metrics, trains both adapters on its own training split with a
class-balanced loss, saves its private entries in its workspace, and returns the whole state dict with its
training-sample count; the job's `SharedKeysOnly` filter lets only the shared keys leave.

After the last round the server sends the final global model twice (`validate` tasks, custom.controller):
- `calibrate`: the site scores its validation split and returns only the histogram of the global model's validation
  scores per class; the server sums them and picks the pooled threshold of the global model;
- `test`: the site chooses its personalised model's threshold on its own validation split, takes the pooled one for
  the global model, scores its test split at those thresholds (AUROC is threshold-free) and writes the metrics, the
  thresholds and per-subject predictions to `test_metrics.json` in its run directory (the same for the benchmark's
  Siemens-profile renderings of the test hearts, split `test_siemens`, where the data hold them: they stay at the
  site), and exports its personalised model (both adapters in peft format, heads, threshold, metadata.json, model
  card) to `personalised_model/` there.
The data come from `$MED_DUALLORA_DATA`, the rows whose `client` is this site. After each training epoch the site
prints a PROGRESS_MARK line and streams the epoch's training loss to the server's tracking.

A job of several replicas (custom.controller) marks each task with its replica's seed: the site then runs each
replica as a run of its own (`Replica`: that seed's model, state, data root and output folder `seed<N>/`).
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.client.lightning import patch as patch_trainer
from nvflare.client.tracking import SummaryWriter

from app.site_config import SITE_CONFIG_FILE, SiteConfig
from custom.site_state import SiteState, site_state_dir, state_digest
from data_prep.datamodule import VendorDataModule
from data_prep.report import read_prepared
from data_prep.splits import REFERENCE_TEST_SPLIT
from models.atomic_io import write_json_atomic
from models.dp import PrivacyLedger
from models.dual_lora import backbone_of
from models.export import backbone_record, input_contract, write_model
from models.lit import QUIET_TRAINER_KWARGS, DualLoRAClassifier
from models.metrics import detection_metrics, score_histogram
from models.policy import SharingPolicy, adapter_of
from models.protocol import (
    CALIBRATE,
    DATA_ENV,
    DP_EPSILON_KEY,
    FULL_MODEL_BYTES_KEY,
    GLOBAL_THRESHOLD_KEY,
    METRIC_NAMES,
    MIN_SUBJECTS_PER_FIGURE,
    PERSONALISED_MODEL_DIR,
    PROGRESS_MARK,
    REPLICA_SEED_KEY,
    SAMPLES_KEY,
    SEED_PLACEHOLDER,
    STAGE_KEY,
    TEST_METRICS_FILE,
    VAL_HISTOGRAM_KEY,
    replica_folder,
)

logger = logging.getLogger(__name__)
VALIDATE_ONLY_WHEN_ASKED = 10**9  # no validation inside fit: the round's explicit pre-fit validation is the report
TRACKED_METRICS = ("val_loss", *(f"val{kind}_{name}" for kind in ("", "_global_only") for name in METRIC_NAMES))
NVFLARE_LIGHTNING_LOGGER = "FLCallback"
"""The logger of NVFlare's Lightning callback (nvflare.app_opt.lightning.api.FLCallback names it after its class)."""
NVFLARE_MISSING_KEYS = "There were missing keys when loading the global state_dict: "


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=SITE_CONFIG_FILE,
        help="the run's SiteConfig as JSON; a relative path is looked up beside the site script (the job's "
        "custom/ folder), then in the working directory",
    )
    return parser.parse_args(argv)


def read_site_config(path: str) -> SiteConfig:
    """The run's SiteConfig from `path` (relative: beside the running script first, then the working directory)."""
    candidates = [Path(path)]
    if not candidates[0].is_absolute():
        candidates.insert(0, Path(sys.argv[0]).resolve().parent / path)
    for candidate in candidates:
        if candidate.is_file():
            return SiteConfig.read(candidate)
    raise FileNotFoundError(f"site configuration {path!r} not found (looked at {[str(c) for c in candidates]})")


def site_run_dir(job_id: str) -> str:
    """The site's folder of this job, `<site workspace>/<job id>`. NVFlare runs the script with the site workspace
    as working directory in the site's job process, and with the app folder `<job id>/app_<...>` in a process of
    its own (a process per round, a site-installed job)."""
    here = Path.cwd()
    if here.parent.name == job_id and here.name.startswith("app"):
        return str(here.parent)
    return str(here / job_id)


def round_seed(seed: int, site: str, current_round: int | None) -> int:
    """The seed of a site's round (data order, augmentation, RNG), so that a round replays identically whether
    the site's process lived on from the previous round or started afresh (simulator `-t` < sites, restarts)."""
    return zlib.crc32(f"{seed}:{site}:{current_round}".encode()) % (2**31)


def private_state(module: DualLoRAClassifier) -> dict[str, torch.Tensor]:
    """Every trainable entry the policy keeps at the site (local adapter, local head)."""
    return {key: value for key, value in module.trainable_state_dict().items() if not module.policy.is_shared(key)}


def restore_private_state(module: DualLoRAClassifier, saved: dict[str, torch.Tensor], source: str) -> None:
    """Load saved private entries; they must be exactly this model's private entries, with the same shapes."""
    expected = private_state(module)
    if set(saved) != set(expected):
        differing = sorted(set(saved) ^ set(expected))
        raise ValueError(f"{source}: saved site state does not fit this model (keys {differing[:3]} differ)")
    wrong = [key for key, value in saved.items() if value.shape != expected[key].shape]
    if wrong:
        raise ValueError(f"{source}: saved site state has other shapes for {wrong[:3]}")
    module.load_state_dict(saved, strict=False)


def full_model_bytes(module: DualLoRAClassifier) -> int:
    """Raw bytes of the model without adapters (backbone and head): what full-model FedAvg would send."""
    return sum(value.nbytes for key, value in module.state_dict().items() if adapter_of(key) is None)


class MissingKeysSummary(logging.Filter):
    """Turns NVFlare's per-round warning listing every key the global model does not carry (the whole frozen
    backbone and the private entries: expected, since only shared keys travel) into one INFO line with counts."""

    def __init__(self, policy: SharingPolicy):
        super().__init__()
        self.policy = policy

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(NVFLARE_MISSING_KEYS):
            return True
        try:
            keys = ast.literal_eval(message[len(NVFLARE_MISSING_KEYS) :])
        except (ValueError, SyntaxError):
            return True
        private = sum(1 for key in keys if self.policy.is_trainable(key))
        record.msg = (
            f"global model loaded; {len(keys)} keys kept from the site's own model, as expected: "
            f"{len(keys) - private} frozen, {private} private (the policy does not share them)"
        )
        record.args = ()
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def summarise_missing_keys(policy: SharingPolicy) -> None:
    """Install MissingKeysSummary on NVFlare's Lightning callback logger (once per process)."""
    flare_logger = logging.getLogger(NVFLARE_LIGHTNING_LOGGER)
    if not any(isinstance(existing, MissingKeysSummary) for existing in flare_logger.filters):
        flare_logger.addFilter(MissingKeysSummary(policy))


class ReportEpochs(pl.Callback):
    """After each training epoch: a PROGRESS_MARK line on stdout (with the replica's seed in a job of several), and
    the epoch's mean training loss streamed to the server's tracking (only when the site trains on at least
    MIN_SUBJECTS_PER_FIGURE subjects)."""

    def __init__(
        self, tracker: SummaryWriter | None, site: str, current_round: int, n_train: int, seed: int | None = None
    ):
        self.tracker = tracker if n_train >= MIN_SUBJECTS_PER_FIGURE else None
        self.site = site
        self.current_round = current_round
        self.seed = seed

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is None:
            return
        epoch = trainer.current_epoch
        replica = "" if self.seed is None else f" seed={self.seed}"
        print(
            f"{PROGRESS_MARK} site={self.site} round={self.current_round} epoch={epoch + 1}/{trainer.max_epochs} "
            f"train_loss={float(loss):.4f}{replica}",
            flush=True,
        )
        if self.tracker is not None:
            step = self.current_round * (trainer.max_epochs or 1) + epoch
            self.tracker.add_scalar(f"{replica_tag_prefix(self.seed)}train_loss", float(loss), global_step=step)


class SavePrivateState(pl.Callback):
    """Logs the digest of the global model the round trains from, and saves the site's private entries (with that
    digest) when training ends, before the FL callback sends the result."""

    def __init__(self, state: SiteState, current_round: int):
        self.state = state
        self.current_round = current_round
        self.global_digest = ""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: DualLoRAClassifier) -> None:
        # The FL callback loads the received global model in on_train_start, which runs before the first epoch.
        if trainer.current_epoch == 0:
            self.global_digest = state_digest(pl_module.shared_state_dict())
            logger.info("round %d: training from the global model %s", self.current_round, self.global_digest)

    def on_train_end(self, trainer: pl.Trainer, pl_module: DualLoRAClassifier) -> None:
        privacy = pl_module.privacy.history if pl_module.dp is not None else None
        self.state.save(private_state(pl_module), self.current_round, self.global_digest, privacy)


class ReportPrivacy(pl.Callback):
    """Under DP-SGD, after each round's training: the ε the site has spent so far goes to its log, the server's
    TensorBoard (`dp_epsilon`) and the round's result metadata (DP_EPSILON_KEY), before the FL callback sends."""

    def __init__(self, tracker: SummaryWriter, current_round: int, seed: int | None):
        self.tracker = tracker
        self.current_round = current_round
        self.seed = seed

    def on_train_end(self, trainer: pl.Trainer, pl_module: DualLoRAClassifier) -> None:
        if pl_module.dp is None:
            return
        epsilon = pl_module.privacy.epsilon(pl_module.dp.delta)
        logger.info(
            "round %d: DP-SGD has spent epsilon %.3f at delta %g (sigma %.4f, %d steps)",
            self.current_round,
            epsilon,
            pl_module.dp.delta,
            pl_module.dp_noise_multiplier,
            pl_module.privacy.steps,
        )
        pl_module.__fl_meta__[DP_EPSILON_KEY] = epsilon
        self.tracker.add_scalar(f"{replica_tag_prefix(self.seed)}dp_epsilon", epsilon, global_step=self.current_round)


def round_trainer(
    config: SiteConfig, state: SiteState, current_round: int, report: ReportEpochs, privacy: ReportPrivacy
) -> pl.Trainer:
    """A fresh trainer patched for one round: a round then runs the same whether the process lived on or not
    (a reused Lightning trainer trains its next fit differently). Its callbacks run before the FL callback sends."""
    trainer = make_trainer(config, state.directory, [SavePrivateState(state, current_round), report, privacy])
    patch_trainer(trainer, restore_state=False, load_state_dict_strict=False)
    return trainer


def make_trainer(config: SiteConfig, root_dir: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=config.local_epochs,
        accelerator="auto",
        devices=1,
        precision=config.trainer_precision(),
        **QUIET_TRAINER_KWARGS,
        check_val_every_n_epoch=VALIDATE_ONLY_WHEN_ASKED,
        default_root_dir=root_dir,
        callbacks=callbacks,
    )


def check_site_data(config: SiteConfig, datamodule: VendorDataModule, module: DualLoRAClassifier) -> dict[str, Any]:
    """Before any training: the site's splits can train and evaluate a model, and its data were prepared to the
    model's input shape. Returns the input contract of the site's data (for the exported model)."""
    site = flare.get_site_name()
    problems = datamodule.split_problems(need_both_classes=config.class_weights == "inverse_frequency")
    prepared = datamodule.root / "prepared.json"
    geometry = read_prepared(datamodule.root)["geometry"]
    shape = [*geometry["crop"], geometry["depth"]]
    model_config = backbone_of(module.model).config
    model_shape = list(model_config.image_size)
    if shape != model_shape:
        problems.append(f"{prepared} field geometry: data prepared at {shape}, the model takes {model_shape}")
    if problems:
        raise ValueError(f"site {site}: cannot train here: " + "; ".join(problems))
    return input_contract(model_config, geometry["spacing_mm"])


def global_model_kind(module: DualLoRAClassifier) -> str | None:
    """Which of the module's evaluated models is the federation's global model: `global_only` (the global adapter
    alone, for a dual policy), `model` (the site's model is the global model), or None (no usable global model)."""
    if not module.policy.has_global_model:
        return None
    return "global_only" if module.hparams.eval_global_only else "model"


def calibration_reply(
    module: DualLoRAClassifier, config: SiteConfig, datamodule: VendorDataModule, run_dir: str
) -> dict[str, Any]:
    """The histogram of the global model's validation scores per class (empty without a global model)."""
    kind = global_model_kind(module)
    if kind is None:
        return {}
    make_trainer(config, run_dir, []).validate(module, datamodule=datamodule, verbose=False)
    rows = module.eval_predictions["val" if kind == "model" else "val_global_only"]
    if len(rows) < MIN_SUBJECTS_PER_FIGURE:
        print(f"site {flare.get_site_name()}: {len(rows)} validation subjects, too few to send their histogram")
        return {}
    histogram = score_histogram([r["p_diseased"] for r in rows], [r["label"] for r in rows])
    return {VAL_HISTOGRAM_KEY: histogram.tolist()}


MODEL_KINDS = {"personalised": ("", "model"), "global_only": ("_global_only", "global_only")}
"""Each scored model: its suffix in the module's evaluation prefixes (`test_global_only_auroc`) and its threshold."""


def final_evaluation(
    module: DualLoRAClassifier,
    config: SiteConfig,
    datamodule: VendorDataModule,
    run_dir: str,
    global_threshold: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test-split metrics of the personalised and the global-only model at their validation thresholds, written to
    the run directory: each site's own for a personalised model, `global_threshold` (pooled) for the global one.
    Returns (the figures the site sends, the full report)."""
    trainer = make_trainer(config, run_dir, [])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    module.choose_thresholds("val")
    kind = global_model_kind(module)
    if kind is not None and global_threshold is not None:
        module.thresholds[kind] = float(global_threshold)
    kinds = {
        name: MODEL_KINDS[name]
        for name in (["personalised", "global_only"] if module.policy.is_dual else ["personalised"])
    }
    thresholds = {name: module.thresholds[threshold] for name, (_, threshold) in kinds.items()}

    def scored(split: str) -> dict[str, Any]:
        predictions = {name: module.eval_predictions[split + suffix] for name, (suffix, _) in kinds.items()}
        models = {
            name: detection_metrics(
                torch.tensor([r["p_diseased"] for r in rows]),
                torch.tensor([r["label"] for r in rows]),
                thresholds[name],
            )
            for name, rows in predictions.items()
        }
        return {"models": models, "predictions": predictions}

    reference = None
    if datamodule.has_split(REFERENCE_TEST_SPLIT):
        trainer.test(module, dataloaders=datamodule.split_dataloader(REFERENCE_TEST_SPLIT), verbose=False)
        reference = scored("test")
    trainer.test(module, datamodule=datamodule, verbose=False)
    test = scored("test")
    report = {
        "site": flare.get_site_name(),
        "policy": module.policy.describe(),
        "n_val": len(datamodule.rows["val"]),
        "n_test": len(datamodule.rows["test"]),
        "thresholds": thresholds,
        "threshold_sources": {
            name: "pooled validation (all sites)"
            if threshold == kind and global_threshold is not None
            else "this site's validation"
            for name, (_, threshold) in kinds.items()
        },
        **test,
        "validation": scored("val"),
        **({REFERENCE_TEST_SPLIT: reference} if reference is not None else {}),
    }
    write_json_atomic(os.path.join(run_dir, TEST_METRICS_FILE), report)
    counts = {f"{name}_n": len(rows) for name, rows in test["predictions"].items()}
    scores = {f"{name}_{metric}": value for name, scores in test["models"].items() for metric, value in scores.items()}
    return {**scores, **counts}, report  # the filter sends a model's figures only with their subject count


def export_personalised(
    module: DualLoRAClassifier,
    config: SiteConfig,
    report: dict[str, Any],
    contract: dict[str, Any],
    completed_round: int | None,
    run_dir: str,
) -> str:
    """Write the site's personalised model (the model its test figures describe) to `personalised_model/`."""
    weights, _ = config.backbone_files()
    metadata = {
        "kind": "personalised",
        "site": report["site"],
        "round": completed_round,
        "input_contract": contract,
        "backbone_weights": backbone_record(config.weights, weights),
        "threshold_source": report["threshold_sources"]["personalised"],
        "metrics": {
            split: {
                "n": len(scored["predictions"]["personalised"]),
                **scored["models"]["personalised"],
            }
            for split, scored in (("validation", report["validation"]), ("test", report))
        },
        "training": config.to_dict(),
    }
    if module.dp is not None:
        metadata["privacy"] = module.privacy.report(module.dp)
    out = os.path.join(run_dir, PERSONALISED_MODEL_DIR)
    write_model(
        out,
        module.model,
        module.policy,
        module.adapter_config,
        module.policy.adapters,
        report["thresholds"]["personalised"],
        metadata,
    )
    print(f"site {report['site']}: personalised model written to {out}", flush=True)
    return out


def track_validation(
    tracker: SummaryWriter, metrics: dict[str, Any], current_round: int, seed: int | None = None
) -> None:
    """Stream the round's validation curves to the server's TensorBoard, unless they describe too few subjects."""
    if float(metrics.get("val_n", 0)) < MIN_SUBJECTS_PER_FIGURE:
        logger.info(
            "round %d: fewer than %d validation subjects; no curve sent", current_round, MIN_SUBJECTS_PER_FIGURE
        )
        return
    for name in TRACKED_METRICS:
        if name in metrics:
            tracker.add_scalar(replica_tag_prefix(seed) + name, float(metrics[name]), global_step=current_round)


def check_global_model(module: DualLoRAClassifier, received: FLModel, current_round: int | None) -> None:
    """Refuse, before anything loads it, a global model that is not one of this site's policy: a key the policy does
    not share (a local adapter, a frozen weight), a missing shared key, or a value of the wrong kind or shape."""
    problems = module.global_model_problems(received.params or {})
    if problems:
        where = "the final evaluation" if current_round is None else f"round {current_round}"
        raise ValueError(f"site {flare.get_site_name()}: {where}: refused the global model: " + "; ".join(problems))


def announce_fedprox(config: SiteConfig, received: FLModel) -> None:
    """Log which FedProx runs this round: NVFlare's (mu sent by the server, applied by its Lightning callback to every
    trained parameter) or the site's own term over the shared keys; never both."""
    sent = (received.meta or {}).get(AlgorithmConstants.FEDPROX_MU)
    if sent and config.site_proximal_mu:
        raise ValueError(f"FedProx twice: the server sent mu={sent} and the site applies mu={config.site_proximal_mu}")
    if sent:
        logger.info("round %d: FedProx mu=%s from the server, applied by NVFlare", received.current_round, sent)
    elif config.site_proximal_mu:
        logger.info(
            "round %d: FedProx mu=%s over the shared keys, applied by the site",
            received.current_round,
            config.site_proximal_mu,
        )


def replica_tag_prefix(seed: int | None) -> str:
    """Prefix of a replica's tracked curves (`seed1/val_bal_acc`); none for a job of one run."""
    return f"{replica_folder(seed)}/" if seed is not None else ""


@dataclass
class Replica:
    """One run the site takes part in: its configuration (seed), model, private state, data and output folder."""

    seed: int | None
    config: SiteConfig
    module: DualLoRAClassifier
    state: SiteState
    data_root: str
    run_dir: str
    contract: dict[str, Any] | None = None


def open_replica(
    config: SiteConfig, site: str, job_run_dir: str, seed: int | None, previous: Replica | None = None
) -> Replica:
    """The site's run of `seed` in a job of several replicas (seed None: the job's one run, as configured).

    The frozen prefix's features of the `previous` replica's subjects are kept: the replicas share the backbone and
    the test set, and the cache itself drops any entry whose backbone or input differs (models.prefix_cache).
    """
    if seed is not None:
        config = config.replace(seed=seed, run_name=f"{config.run_name}.{replica_folder(seed)}")
    data_root = os.environ.get(DATA_ENV)
    if not data_root:
        raise OSError(f"{DATA_ENV} is not set at site {site}: point it at the prepared data root")
    run_dir = os.path.join(job_run_dir, replica_folder(seed))
    os.makedirs(run_dir, exist_ok=True)
    workspace = os.path.dirname(job_run_dir)
    module = config.build_module()
    if previous is not None and previous.module.prefix_cache is not None and module.prefix_cache is not None:
        module.prefix_cache = previous.module.prefix_cache
    return Replica(
        seed=seed,
        config=config,
        module=module,
        state=SiteState(site_state_dir(config.run_name, site, workspace=workspace), config.run_name),
        data_root=data_root.replace(SEED_PLACEHOLDER, str(config.seed)),
        run_dir=run_dir,
    )


def main(argv: Sequence[str] | None = None) -> None:
    job_config = read_site_config(parse_args(argv).config)
    if job_config.threads:
        torch.set_num_threads(job_config.threads)
    flare.init()
    site = flare.get_site_name()
    job_run_dir = site_run_dir(flare.get_job_id())
    tracker = SummaryWriter()
    summarise_missing_keys(job_config.policy)
    replica: Replica | None = None
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        seed = (received.meta or {}).get(REPLICA_SEED_KEY)
        if replica is None or replica.seed != seed:
            replica = open_replica(job_config, site, job_run_dir, seed, previous=replica)
        config, module, state, run_dir = replica.config, replica.module, replica.state, replica.run_dir
        evaluating = flare.is_evaluate()
        current_round = None if evaluating else received.current_round
        check_global_model(module, received, current_round)
        saved_round = state.resume_round(current_round)
        if saved_round is not None:
            restore_private_state(module, state.load(saved_round)[0], state.path)
        if module.dp is not None:
            module.privacy = PrivacyLedger(state.privacy_history(saved_round) if saved_round is not None else [])
        round_seed_value = round_seed(config.seed, site, current_round)
        datamodule = VendorDataModule(
            replica.data_root,
            clients=[site],
            batch_size=config.batch_size,
            augment=config.augment,
            num_workers=config.num_workers,
            seed=round_seed_value,
            poisson_sampling=module.dp is not None,
        )
        if replica.contract is None:
            replica.contract = check_site_data(config, datamodule, module)
        if evaluating:
            module.load_shared_state_dict(received.params or {})
            meta = received.meta or {}
            if meta.get(STAGE_KEY) == CALIBRATE:
                flare.send(FLModel(metrics=calibration_reply(module, config, datamodule, run_dir)))
            else:
                threshold = meta.get(GLOBAL_THRESHOLD_KEY)
                figures, report = final_evaluation(module, config, datamodule, run_dir, threshold)
                export_personalised(module, config, report, replica.contract, state.latest_round(), run_dir)
                flare.send(FLModel(metrics=figures))
            continue
        announce_fedprox(config, received)
        pl.seed_everything(round_seed_value, verbose=False)
        site_meta = {FULL_MODEL_BYTES_KEY: full_model_bytes(module), SAMPLES_KEY: datamodule.num_train_samples}
        module.__fl_meta__ = site_meta
        n_train = datamodule.num_train_samples
        report = ReportEpochs(tracker, site, received.current_round, n_train, replica.seed)
        privacy = ReportPrivacy(tracker, received.current_round, replica.seed)
        trainer = round_trainer(config, state, received.current_round, report, privacy)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        track_validation(tracker, trainer.callback_metrics, received.current_round, replica.seed)
        trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main()
