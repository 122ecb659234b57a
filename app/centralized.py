"""Centralized baseline without NVFlare: `python -m app.centralized --config app/configs/centralized_micro.yaml`.

Trains the federated clients' LightningModule on the pooled training split of every site (or of the sites named by
`--data.clients`, e.g. `[ge]` for a local-only baseline) with its class-balanced loss, chooses the decision threshold
on the pooled validation split (models.metrics, the rule the federated models use), then tests per vendor and pooled
at that threshold, writes the metrics JSON (with every test subject's P(diseased), and those of the benchmark's
Siemens-profile test renderings where the data hold them) to `--metrics_out` and exports the model (models.export
format: peft adapter, heads, threshold, metadata.json, model card) to `--model_out` (default: `model/` beside the
metrics).
A training split too small to train, or an empty validation or test split, stops it before training. Data come
from the prepared root `--data.root` or `$MED_DUALLORA_DATA`. `app/configs/centralized_standin.yaml` adapts the
committed stand-in backbone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from data_prep.datamodule import VendorDataModule
from data_prep.report import read_prepared
from data_prep.splits import REFERENCE_TEST_SPLIT
from models.atomic_io import write_json_atomic
from models.dual_lora import backbone_of
from models.export import backbone_record, input_contract, write_model
from models.lit import DualLoRAClassifier
from models.metrics import mean_over_sites, weighted_mean_over_sites
from models.standin import resolve_backbone

DEFAULT_METRICS_OUT = "runs/centralized/metrics.json"


class CentralizedCLI(LightningCLI):
    """LightningCLI with the metrics path and the schedule length tied to the trainer's epochs."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--metrics_out", type=str, default=DEFAULT_METRICS_OUT, help="metrics JSON to write")
        parser.add_argument(
            "--model_out", type=str, default=None, help="exported model folder (default: model/ beside the metrics)"
        )
        parser.link_arguments("trainer.max_epochs", "model.max_epochs")


def _finite_or_none(value: float) -> float | int | None:
    if isinstance(value, int):
        return value
    return float(value) if math.isfinite(value) else None


def _json_safe(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metric dicts with NaN (undefined, e.g. specificity without a healthy subject) written as null."""
    return {
        name: _json_safe(value) if isinstance(value, Mapping) else _finite_or_none(value)
        for name, value in metrics.items()
    }


def summarize(grouped: Mapping[str, Any]) -> dict[str, Any]:
    """Pooled and per-client metrics plus their unweighted and test-size-weighted means over clients."""
    clients = grouped["clients"]
    return {
        "pooled": dict(grouped["pooled"]),
        "clients": {name: dict(metrics) for name, metrics in clients.items()},
        "mean_over_clients": mean_over_sites(clients),
        "weighted_mean_over_clients": weighted_mean_over_sites(
            clients, {name: metrics["n"] for name, metrics in clients.items()}
        ),
    }


def run(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `args` (default: the command line), fit, test, write and return the metrics report."""
    cli = CentralizedCLI(
        DualLoRAClassifier,
        VendorDataModule,
        run=False,
        args=list(args) if args is not None else None,
        save_config_callback=None,
        seed_everything_default=0,
    )
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    datamodule.require_usable_splits(need_both_classes=module.hparams.class_weights == "inverse_frequency")
    geometry = read_prepared(datamodule.root)["geometry"]
    trainer.fit(module, datamodule=datamodule)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    threshold = module.choose_thresholds("val")["model"]
    predictions = {"val": module.eval_predictions["val"]}
    if datamodule.has_split(REFERENCE_TEST_SPLIT):
        trainer.test(module, dataloaders=datamodule.split_dataloader(REFERENCE_TEST_SPLIT), verbose=False)
        predictions[REFERENCE_TEST_SPLIT] = module.eval_predictions["test"]
    trainer.test(module, datamodule=datamodule, verbose=False)
    predictions["test"] = module.eval_predictions["test"]
    report = {
        "kind": "centralized" if len(datamodule.clients) > 1 else "local_only",
        "trained_on": list(datamodule.clients),
        "train_samples": datamodule.num_train_samples,
        "epochs": trainer.current_epoch,
        "seed": cli.config.seed_everything,
        "backbone": module.hparams.cinema_config or module.hparams.backbone,
        "weights": module.hparams.weights,
        "policy": module.policy.describe(),
        "threshold": threshold,
        "threshold_source": "pooled validation",
        "test": _json_safe(summarize(module.eval_results["test"])),
        "val": _json_safe(summarize(module.eval_results["val"])),
        "predictions": predictions,
    }
    model_out = cli.config.model_out or os.path.join(os.path.dirname(cli.config.metrics_out) or ".", "model")
    contract = input_contract(backbone_of(module.model).config, geometry["spacing_mm"])
    export_centralized(module, report, contract, model_out)
    report["model"] = model_out
    write_json_atomic(cli.config.metrics_out, report)
    return report


def export_centralized(module: DualLoRAClassifier, report: dict[str, Any], contract: dict[str, Any], out: str) -> None:
    """Write the trained model and its pooled threshold in the format of the federated models (models.export)."""
    weights, _ = resolve_backbone(module.hparams.weights, module.hparams.cinema_config)
    metadata = {
        "kind": "centralized",
        "site": None,
        "trained_on": report["trained_on"],
        "round": None,
        "input_contract": contract,
        "backbone_weights": backbone_record(module.hparams.weights, weights),
        "threshold_source": report["threshold_source"],
        "metrics": {"validation": report["val"]["pooled"], "test": report["test"]["pooled"]},
        "per_client_test": report["test"]["clients"],
    }
    write_model(
        out, module.model, module.policy, module.adapter_config, module.policy.adapters, report["threshold"], metadata
    )
    print(f"model written to {out}")


if __name__ == "__main__":
    run()
