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
  thresholds and per-subject predictions to `test_metrics.json` in its run directory.
The data come from `$MED_DUALLORA_DATA`, the rows whose `client` is this site.
"""

from __future__ import annotations

import argparse
import logging
import os
import zlib
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.client.lightning import patch as patch_trainer
from nvflare.client.tracking import SummaryWriter

from custom.aggregators import SAMPLES_KEY
from custom.comm import FULL_MODEL_BYTES_KEY
from custom.evaluation import CALIBRATE, GLOBAL_THRESHOLD_KEY, MIN_HISTOGRAM_SUBJECTS, STAGE_KEY, VAL_HISTOGRAM_KEY
from custom.site_state import SiteState, site_state_dir, state_digest
from data_prep.datamodule import VendorDataModule
from models.atomic_io import write_json_atomic
from models.config import ConvViTConfig
from models.dual_lora import DualLoRAConfig, build_policy
from models.lit import METRIC_NAMES, QUIET_TRAINER_KWARGS, DualLoRAClassifier
from models.metrics import detection_metrics, score_histogram
from models.policy import SharingPolicy
from models.standin import RANDOM, STANDIN, resolve_backbone

logger = logging.getLogger(__name__)
DATA_ENV = "MED_DUALLORA_DATA"
DEFAULT_PRESET = "micro"
"""The ConvViT preset of a random backbone or a checkpoint given without its config.yaml."""
TEST_METRICS_FILE = "test_metrics.json"
VALIDATE_ONLY_WHEN_ASKED = 10**9  # no validation inside fit: the round's explicit pre-fit validation is the report
TRACKED_METRICS = ("val_loss", *(f"val{kind}_{name}" for kind in ("", "_global_only") for name in METRIC_NAMES))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", required=True, help="names the site-state folder; the job name")
    parser.add_argument("--policy", default="med_duallora", help="sharing policy (models.policy.POLICY_NAMES)")
    parser.add_argument("--share-head", choices=("default", "yes", "no"), default="default")
    parser.add_argument(
        "--weights",
        default=STANDIN,
        help=f"`{STANDIN}` (the committed stand-in, default), `{RANDOM}` (a random backbone, said loudly), or a "
        "CineMA .safetensors path at the site ($VARS are expanded)",
    )
    parser.add_argument(
        "--cinema-config", default=None, help="CineMA config.yaml of the weights ($VARS expanded; not with standin)"
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help=f"ConvViT preset without a config: micro, mini, small, base (default {DEFAULT_PRESET})",
    )
    parser.add_argument("--blocks", default=None, help="comma-separated adapted blocks (default: the last two)")
    parser.add_argument("--global-r", type=int, default=8)
    parser.add_argument("--local-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "--proximal-mu", type=float, default=0.0, help="FedProx: weight of the proximal term on the shared keys"
    )

    return parser.parse_args(argv)


def _site_file(option: str, value: str) -> str:
    """A path option with environment variables expanded; a file that is not there is an error."""
    path = os.path.expandvars(value)
    if "$" in path or not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {value!r} -> {path!r}: no such file at this site (no random fallback)")
    return path


def site_backbone(args: argparse.Namespace, check_weights: bool = True) -> tuple[str | None, str | None]:
    """(weights, config.yaml) of the site model: the stand-in's checked files, none for `random`, or the site's
    own files ($VARS expanded; a file that is not there is an error, never a random fallback). Without
    `check_weights` a weights path is returned as given (what the model's shape needs is only the config)."""
    if args.weights == STANDIN and args.backbone:
        raise ValueError(f"--weights {STANDIN} comes with its own config: drop --backbone")
    if args.cinema_config and args.backbone:
        raise ValueError("give --cinema-config or --backbone, not both")
    config = _site_file("--cinema-config", args.cinema_config) if args.cinema_config else None
    weights = args.weights
    if check_weights and weights not in (STANDIN, RANDOM):
        weights = _site_file("--weights", weights)
    return resolve_backbone(weights, config)


def model_config(args: argparse.Namespace) -> ConvViTConfig:
    """The ConvViT dimensions the site model will have (from the config.yaml, else the preset)."""
    _, config = site_backbone(args, check_weights=False)
    return ConvViTConfig.from_cinema_yaml(config) if config else ConvViTConfig.preset(args.backbone or DEFAULT_PRESET)


def share_head_flag(choice: str) -> bool | None:
    return {"default": None, "yes": True, "no": False}[choice]


def round_seed(seed: int, site: str, current_round: int | None) -> int:
    """The seed of a site's round (data order, augmentation, RNG), so that a round replays identically whether
    the site's process lived on from the previous round or started afresh (simulator `-t` < sites, restarts)."""
    return zlib.crc32(f"{seed}:{site}:{current_round}".encode()) % (2**31)


def adapter_config(args: argparse.Namespace) -> DualLoRAConfig:
    """Where the adapters sit and their ranks; A matrices drawn from the run seed, identical at every site."""
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    return DualLoRAConfig(blocks=blocks, global_r=args.global_r, local_r=args.local_r, init_seed=args.seed)


def policy_from_args(args: argparse.Namespace) -> SharingPolicy:
    """The sharing policy as the site model resolves it (for `fedavg_full`, the blocks it fine-tunes)."""
    depth = model_config(args).depth
    return build_policy(args.policy, adapter_config(args), depth, share_head_flag(args.share_head))


def build_module(args: argparse.Namespace) -> DualLoRAClassifier:
    """The site's LightningModule, seeded by the run seed (a local head starts equal at every site).

    The learning rate is constant: every round starts a fresh optimiser, so a schedule would restart each round.
    """
    adapter = adapter_config(args)
    weights, config = site_backbone(args)
    torch.manual_seed(args.seed)
    return DualLoRAClassifier(
        backbone=args.backbone or DEFAULT_PRESET,
        cinema_config=config,
        weights=weights,
        adapter=adapter,
        policy=args.policy,
        share_head=share_head_flag(args.share_head),
        lr=args.lr,
        warmup_epochs=0.0,
        min_lr=args.lr,
        max_epochs=args.local_epochs,
        class_weights="inverse_frequency",
        eval_global_only=policy_from_args(args).is_dual,
        proximal_mu=args.proximal_mu,
    )


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
    return sum(value.nbytes for key, value in module.state_dict().items() if "lora_" not in key)


class SavePrivateState(pl.Callback):
    """Logs the digest of the global model the round trains from, and saves the site's private entries when
    training ends, before the FL callback sends the result."""

    def __init__(self, state: SiteState, current_round: int):
        self.state = state
        self.current_round = current_round

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: DualLoRAClassifier) -> None:
        # The FL callback loads the received global model in on_train_start, which runs before the first epoch.
        if trainer.current_epoch == 0:
            digest = state_digest(pl_module.shared_state_dict())
            logger.info("round %d: training from the global model %s", self.current_round, digest)

    def on_train_end(self, trainer: pl.Trainer, pl_module: DualLoRAClassifier) -> None:
        self.state.save(private_state(pl_module), self.current_round)


def round_trainer(args: argparse.Namespace, state: SiteState, current_round: int) -> pl.Trainer:
    """A fresh trainer patched for one round: a round then runs the same whether the process lived on or not
    (a reused Lightning trainer trains its next fit differently)."""
    trainer = make_trainer(args, state.directory, [SavePrivateState(state, current_round)])
    patch_trainer(trainer, restore_state=False, load_state_dict_strict=False)
    return trainer


def make_trainer(args: argparse.Namespace, root_dir: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=args.local_epochs,
        accelerator="auto",
        devices=1,
        **QUIET_TRAINER_KWARGS,
        check_val_every_n_epoch=VALIDATE_ONLY_WHEN_ASKED,
        default_root_dir=root_dir,
        callbacks=callbacks,
    )


def require_subjects(datamodule: VendorDataModule, *splits: str) -> None:
    """Fail with the site and the manifest named when one of `splits` has no subject at this site."""
    for split in splits:
        if not datamodule.rows[split]:
            raise ValueError(
                f"site {flare.get_site_name()}: no {split} subjects in {datamodule.root / 'manifest.csv'}"
            )


def global_model_kind(module: DualLoRAClassifier) -> str | None:
    """Which of the module's evaluated models is the federation's global model: `global_only` (the global adapter
    alone, for a dual policy), `model` (the site's model is the global model), or None (no usable global model)."""
    if not module.policy.has_global_model:
        return None
    return "global_only" if module.hparams.eval_global_only else "model"


def calibration_reply(
    module: DualLoRAClassifier, args: argparse.Namespace, datamodule: VendorDataModule, run_dir: str
) -> dict[str, Any]:
    """The histogram of the global model's validation scores per class (empty without a global model)."""
    kind = global_model_kind(module)
    if kind is None:
        return {}
    require_subjects(datamodule, "val")
    make_trainer(args, run_dir, []).validate(module, datamodule=datamodule, verbose=False)
    rows = module.eval_predictions["val" if kind == "model" else "val_global_only"]
    if len(rows) < MIN_HISTOGRAM_SUBJECTS:
        print(f"site {flare.get_site_name()}: {len(rows)} validation subjects, too few to send their histogram")
        return {}
    histogram = score_histogram([r["p_diseased"] for r in rows], [r["label"] for r in rows])
    return {VAL_HISTOGRAM_KEY: histogram.tolist()}


MODEL_KINDS = {"personalised": ("", "model"), "global_only": ("_global_only", "global_only")}
"""Each scored model: its suffix in the module's evaluation prefixes (`test_global_only_auroc`) and its threshold."""


def final_evaluation(
    module: DualLoRAClassifier,
    args: argparse.Namespace,
    datamodule: VendorDataModule,
    run_dir: str,
    global_threshold: float | None,
) -> dict[str, Any]:
    """Test-split metrics of the personalised and the global-only model at their validation thresholds, written to
    the run directory: each site's own for a personalised model, `global_threshold` (pooled) for the global one."""
    require_subjects(datamodule, "val", "test")
    trainer = make_trainer(args, run_dir, [])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    module.choose_thresholds("val")
    kind = global_model_kind(module)
    if kind is not None and global_threshold is not None:
        module.thresholds[kind] = float(global_threshold)
    trainer.test(module, datamodule=datamodule, verbose=False)
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
    }
    write_json_atomic(os.path.join(run_dir, TEST_METRICS_FILE), report)
    return {f"{name}_{metric}": value for name, scores in test["models"].items() for metric, value in scores.items()}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    run_dir = os.path.join(os.getcwd(), flare.get_job_id())
    data_root = os.environ.get(DATA_ENV)
    if not data_root:
        raise OSError(f"{DATA_ENV} is not set at site {site}: point it at the prepared data root")
    module = build_module(args)
    state = SiteState(site_state_dir(args.run_name, site))
    tracker = SummaryWriter()
    site_meta = {FULL_MODEL_BYTES_KEY: full_model_bytes(module)}
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        evaluating = flare.is_evaluate()
        saved = state.for_round(None if evaluating else received.current_round)
        if saved is not None:
            restore_private_state(module, saved, state.path)
        seed = round_seed(args.seed, site, None if evaluating else received.current_round)
        datamodule = VendorDataModule(data_root, clients=[site], batch_size=args.batch_size, seed=seed)
        if evaluating:
            module.load_shared_state_dict(received.params or {})
            meta = received.meta or {}
            if meta.get(STAGE_KEY) == CALIBRATE:
                flare.send(FLModel(metrics=calibration_reply(module, args, datamodule, run_dir)))
            else:
                threshold = meta.get(GLOBAL_THRESHOLD_KEY)
                flare.send(FLModel(metrics=final_evaluation(module, args, datamodule, run_dir, threshold)))
            continue
        pl.seed_everything(seed, verbose=False)
        module.__fl_meta__ = {**site_meta, SAMPLES_KEY: datamodule.num_train_samples}
        trainer = round_trainer(args, state, received.current_round)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        for name in TRACKED_METRICS:
            if name in trainer.callback_metrics:
                tracker.add_scalar(name, float(trainer.callback_metrics[name]), global_step=received.current_round)
        trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main()
