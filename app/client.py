"""Site training script run by NVFlare's Lightning Client API: validate personalised, train, send the shared part.

Each `train` round a site receives the global model (the keys its policy shares), validates its personalised model
(global + its own local adapter) and reports those metrics, trains both adapters on its own training split, saves
its private entries in its workspace, and returns the whole state dict with its training-sample count; the job's
`SharedKeysOnly` filter lets only the shared keys leave. On the final `validate` task it scores the final global
model on its test split twice, personalised and global-only, and writes both to `test_metrics.json` in its run
directory. The data come from `$MED_DUALLORA_DATA`, the rows whose `client` is this site.
"""

from __future__ import annotations

import argparse
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
from custom.site_state import SiteState, site_state_dir
from data_prep.datamodule import VendorDataModule
from models.atomic_io import write_json_atomic
from models.config import ConvViTConfig
from models.dual_lora import DualLoRAConfig, build_policy
from models.lit import METRIC_NAMES, QUIET_TRAINER_KWARGS, DualLoRAClassifier
from models.policy import SharingPolicy

DATA_ENV = "MED_DUALLORA_DATA"
TEST_METRICS_FILE = "test_metrics.json"
VALIDATE_ONLY_WHEN_ASKED = 10**9  # no validation inside fit: the round's explicit pre-fit validation is the report
TRACKED_METRICS = ("val_loss", *(f"val{kind}_{name}" for kind in ("", "_global_only") for name in METRIC_NAMES))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", required=True, help="names the site-state folder; the job name")
    parser.add_argument("--policy", default="med_duallora", help="sharing policy (models.policy.POLICY_NAMES)")
    parser.add_argument("--share-head", choices=("default", "yes", "no"), default="default")
    parser.add_argument("--backbone", default="micro", help="ConvViT preset: micro, small, base, ...")
    parser.add_argument("--weights", default=None, help="CineMA .safetensors at the site; $VARS are expanded")
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


def resolve_weights(weights: str | None) -> str | None:
    """The weights path with environment variables expanded; a named file that is not there is an error."""
    if weights is None:
        return None
    path = os.path.expandvars(weights)
    if "$" in path or not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {weights!r} -> {path!r}: no such file at this site (no random fallback)")
    return path


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
    depth = ConvViTConfig.preset(args.backbone).depth
    return build_policy(args.policy, adapter_config(args), depth, share_head_flag(args.share_head))


def build_module(args: argparse.Namespace) -> DualLoRAClassifier:
    """The site's LightningModule, seeded by the run seed (a local head starts equal at every site).

    The learning rate is constant: every round starts a fresh optimiser, so a schedule would restart each round.
    """
    adapter = adapter_config(args)
    torch.manual_seed(args.seed)
    return DualLoRAClassifier(
        backbone=args.backbone,
        weights=resolve_weights(args.weights),
        adapter=adapter,
        policy=args.policy,
        share_head=share_head_flag(args.share_head),
        lr=args.lr,
        warmup_epochs=0.0,
        min_lr=args.lr,
        max_epochs=args.local_epochs,
        eval_global_only=set(policy_from_args(args).adapters) == {"global", "local"},
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
    """Saves the site's private entries when training ends, before the FL callback sends the result."""

    def __init__(self, state: SiteState, current_round: int):
        self.state = state
        self.current_round = current_round

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


def final_evaluation(
    module: DualLoRAClassifier, args: argparse.Namespace, datamodule: VendorDataModule, run_dir: str
) -> dict[str, Any]:
    """Test-split metrics of the personalised and the global-only model, written to the run directory."""
    metrics = make_trainer(args, run_dir, []).test(module, datamodule=datamodule, verbose=False)[0]
    if not metrics.get("test_n"):
        raise ValueError(f"site {flare.get_site_name()}: no test subjects in {datamodule.root / 'manifest.csv'}")
    kinds = {"personalised": "test_"}
    if module.hparams.eval_global_only:
        kinds["global_only"] = "test_global_only_"
    report = {
        "site": flare.get_site_name(),
        "policy": module.policy.describe(),
        "n_test": int(metrics.get("test_n", 0)),
        "models": {
            kind: {name: float(metrics[prefix + name]) for name in METRIC_NAMES} for kind, prefix in kinds.items()
        },
        "predictions": {kind: module.eval_predictions[prefix.rstrip("_")] for kind, prefix in kinds.items()},
    }
    write_json_atomic(os.path.join(run_dir, TEST_METRICS_FILE), report)
    return {f"{kind}_{name}": value for kind, scores in report["models"].items() for name, value in scores.items()}


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
            flare.send(FLModel(metrics=final_evaluation(module, args, datamodule, run_dir)))
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
