"""`python -m app.pretrain`: a stand-in for CineMA's pretrained weights, from supervised pathology pretraining.

CineMA's weights cannot be downloaded here, and the benchmark must not adapt a random backbone. This recipe trains the
whole ConvViT (all parameters) on pathology labels (PRETRAINING_TARGETS: healthy vs diseased by default, or five
structural groups) of a separate synthetic cohort (its own seed; no subject shared with the federated cohort,
checked), then writes the backbone in CineMA's fine-tuned checkpoint format
with a CineMA downstream config.yaml, so that the benchmark loads it through `models.load_cinema` like real weights.
The heads are re-initialised for the 2-class downstream task, as CineMA's pretrained (MAE) checkpoint leaves them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import yaml

from app.cohort_steps import prepare_split, synthesize
from data_prep.preprocess import read_volume
from models.atomic_io import write_text_atomic
from models.config import PRESET_NAMES, ConvViTConfig
from models.convvit import ConvViT
from models.lit import QUIET_TRAINER_KWARGS
from models.loading import HEAD_PREFIX, load_cinema, save_cinema

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
RECORD_NAME = "pretrain.json"
DOWNSTREAM_CLASSES = ["NOR", "ABN"]
"""Downstream config's class list: 0 = NOR (healthy), 1 = any pathology, like the federated task."""
DEFAULT_EPOCHS = 100
"""Full training needs ~100 epochs of an 80-subject cohort before the loss leaves chance level (10 learn nothing)."""
PATHOLOGY_GROUPS: dict[str, str] = {
    "NOR": "NOR",
    **dict.fromkeys(("DCM", "MINF", "IHD", "LV", "AHS"), "LV_DILATED"),
    **dict.fromkeys(("HCM", "HHD"), "LV_HYPERTROPHY"),
    **dict.fromkeys(("RV", "ARV", "ARR", "TRI", "CIA", "FALL"), "RV_ABNORMAL"),
    "Other": "OTHER",
}
"""Pretraining target: each pathology code's group by the structure it changes (data_prep/anatomy.py shifts).

The 14 codes of an 80-subject cohort leave a few subjects per class and nothing is learnt (test accuracy 0.06);
the five groups are learnable at that size and still teach LV and RV size, wall and function features.
"""
PRETRAINING_TARGETS: dict[str, dict[str, str]] = {
    "groups": PATHOLOGY_GROUPS,
    "healthy_vs_diseased": {code: "NOR" if code == "NOR" else "ABN" for code in PATHOLOGY_GROUPS},
}
"""Pretraining targets by name: the five structural groups, or healthy vs any pathology (the downstream task's
labels, on the separate pretraining cohort).

Measured on a 200-subject pretraining cohort (100 epochs), then LoRA on the frozen backbone for 20 epochs on the
160-subject federated cohort, pooled over sites: test balanced accuracy 0.65 after `healthy_vs_diseased`, 0.58 after
`groups` and 0.50 on a random backbone (docs/evaluation.md, "The backbone").
"""
DEFAULT_TARGET = "healthy_vs_diseased"


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a prepared root's manifest.csv; an error names the file and the missing column."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("subject_id", "split", "pathology", "image"):
        if rows and column not in rows[0]:
            raise ValueError(f"{path}: manifest has no column {column!r}")
    return rows


def namespace_subject_ids(prepared: Path, namespace: str) -> None:
    """Prefix the cohort's subject ids with `namespace` (the original id stays in `source_subject_id`).

    The synthesizer reuses the real datasets' id conventions (ACDC `patient001`, M&Ms-2 `001`), so two cohorts made
    with different seeds share ids while sharing no subject. The namespace makes the ids disjoint as well.
    """
    manifest = prepared / "manifest.csv"
    rows = read_manifest(manifest)
    if all(row["subject_id"].startswith(namespace) for row in rows):
        return
    for row in rows:
        row["source_subject_id"] = row["subject_id"]
        row["subject_id"] = namespace + row["subject_id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(manifest, buffer.getvalue())


def volume_digests(prepared: Path) -> dict[str, str]:
    """sha256 of every subject's voxels as the data module holds them (uint8 of the [0, 1] volume), by subject id."""
    digests = {}
    for row in read_manifest(prepared / "manifest.csv"):
        voxels = np.rint(read_volume(prepared / row["image"]) * 255).astype(np.uint8)
        digests[row["subject_id"]] = hashlib.sha256(voxels.tobytes()).hexdigest()
    return digests


def assert_disjoint(pretraining: Path, federated: Sequence[Path]) -> dict[str, int]:
    """Raise unless the pretraining cohort shares neither a subject id nor a volume with any federated cohort."""
    ours = volume_digests(pretraining)
    ours_by_digest = {digest: subject for subject, digest in ours.items()}
    for root in federated:
        theirs = volume_digests(root)
        same_ids = sorted(set(ours) & set(theirs))
        if same_ids:
            raise ValueError(
                f"{pretraining / 'manifest.csv'} and {root / 'manifest.csv'} share {len(same_ids)} subject id(s), "
                f"e.g. {same_ids[:5]}: the pretraining cohort must be disjoint from the federated cohort"
            )
        same_volumes = sorted(ours_by_digest[digest] for digest in set(ours_by_digest) & set(theirs.values()))
        if same_volumes:
            raise ValueError(
                f"{pretraining} and {root} hold {len(same_volumes)} identical volume(s) (e.g. {same_volumes[:5]}): "
                "the same subject is in both cohorts"
            )
    return {"pretraining_subjects": len(ours), "federated_roots_checked": len(federated)}


def pathology_group(code: str, subject_id: str = "", target: str = DEFAULT_TARGET) -> str:
    """The pretraining class of a pathology code under `target`; an unknown code is an error naming the subject."""
    grouping = PRETRAINING_TARGETS[target]
    if code not in grouping:
        raise ValueError(f"subject {subject_id!r}: pathology {code!r} has no group in {sorted(grouping)}")
    return grouping[code]


def pathology_classes(rows: Sequence[Mapping[str, str]], target: str = DEFAULT_TARGET) -> list[str]:
    """Sorted pretraining classes of the whole pretraining cohort (a rare group may miss the training split)."""
    classes = sorted({pathology_group(row["pathology"], row["subject_id"], target) for row in rows})
    if len({pathology_group(row["pathology"], target=target) for row in rows if row["split"] == "train"}) < 2:
        raise ValueError(f"pretraining needs at least two pathology groups in the training split (cohort {classes})")
    return classes


def synthesize_and_prepare(
    cohort_dir: Path, seed: int, subjects_per_vendor: int, prepare_options: Sequence[str]
) -> Path:
    """Generate the pretraining cohort with the data_prep CLIs (unless already prepared) and return its root."""
    raw, prepared = cohort_dir / "raw", cohort_dir / "prepared"
    if not (prepared / "manifest.csv").exists():
        synthesize(raw, seed, subjects_per_vendor, _print)
    return prepare_split(raw, prepared, seed, prepare_options, _print)


def _print(message: str) -> None:
    print(message, flush=True)


class PathologyPretrainer(pl.LightningModule):
    """Full training of a ConvViT on pathology groups: CE with label smoothing, AdamW, cosine schedule."""

    def __init__(
        self,
        config: ConvViTConfig,
        classes: Sequence[str],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        target: str = DEFAULT_TARGET,
    ):
        super().__init__()
        self.model = ConvViT(config)
        self.classes = list(classes)
        self.target = target
        self.lr, self.weight_decay = lr, weight_decay
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def _targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        index = {name: position for position, name in enumerate(self.classes)}
        groups = [
            pathology_group(p, s, self.target) for p, s in zip(batch["pathology"], batch["subject_id"], strict=True)
        ]
        unknown = sorted(set(groups) - set(index))
        if unknown:
            raise ValueError(f"subjects {batch['subject_id']}: group {unknown} is not a class of {self.classes}")
        return torch.tensor([index[g] for g in groups], device=self.device)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.model(batch["image"]), self._targets(batch), label_smoothing=0.1)
        self.log("train_loss", loss, batch_size=len(batch["pathology"]))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._outputs["val"].append((self.model(batch["image"]).argmax(1).cpu(), self._targets(batch).cpu()))

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._outputs["test"].append((self.model(batch["image"]).argmax(1).cpu(), self._targets(batch).cpu()))

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self._accuracy("val"), batch_size=1)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._accuracy("test"), batch_size=1)

    def _accuracy(self, stage: str) -> dict[str, float]:
        outputs, self._outputs[stage] = self._outputs[stage], []
        if not outputs:
            return {}
        predicted = torch.cat([o[0] for o in outputs])
        targets = torch.cat([o[1] for o in outputs])
        recalls = [float((predicted[targets == c] == c).float().mean()) for c in targets.unique().tolist()]
        return {
            f"{stage}_accuracy": float((predicted == targets).float().mean()),
            f"{stage}_macro_recall": sum(recalls) / len(recalls),
        }

    def configure_optimizers(self) -> dict[str, Any]:
        decayed = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        plain = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": self.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def voxel_spacing(prepared: Path) -> tuple[float, ...]:
    """Voxel spacing (mm) of the prepared volumes, from the first one's NIfTI header."""
    first = read_manifest(prepared / "manifest.csv")[0]
    return tuple(float(zoom) for zoom in nib.load(str(prepared / first["image"])).header.get_zooms()[:3])


def downstream_model(trained: ConvViT, seed: int) -> ConvViT:
    """The trained backbone with fresh (seeded) 2-class heads: the checkpoint the downstream task starts from."""
    config = dataclasses.replace(trained.config, n_classes=len(DOWNSTREAM_CLASSES))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ConvViT(config)
    backbone = {key: value for key, value in trained.state_dict().items() if not key.startswith(HEAD_PREFIX)}
    result = model.load_state_dict(backbone, strict=False)
    if result.unexpected_keys or any(not key.startswith(HEAD_PREFIX) for key in result.missing_keys):
        raise RuntimeError(f"backbone transfer mismatch: {result}")
    return model


def cinema_config(size: str, config: ConvViTConfig, seed: int, spacing: Sequence[float]) -> dict[str, Any]:
    """A CineMA downstream config.yaml (the schema of CineMA's classification configs) describing the model."""
    return {
        "task": "classification",
        "seed": seed,
        "grad_ckpt": False,
        "data": {
            "sax": {
                "spacing": [float(s) for s in spacing],
                "patch_size": list(config.image_size),
                "in_chans": config.in_chans,
            },
            "class_column": "pathology",
            "pathology": list(DOWNSTREAM_CLASSES),
        },
        "model": {
            "name": "convvit",
            "views": "sax",
            "n_frames": config.n_frames,
            "out_chans": None,
            "convvit": {
                "size": size,
                "enc_patch_size": list(config.patch_size),
                "enc_scale_factor": list(config.scale_factor),
                "enc_conv_chans": list(config.conv_chans),
                "enc_conv_n_blocks": config.conv_n_blocks,
                "dropout": 0.0,
                "drop_path": config.drop_path,
            },
        },
    }


def pretrain(
    out_dir: Path,
    seed: int,
    federated_roots: Sequence[Path],
    preset: str = "micro",
    subjects_per_vendor: int = 12,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 4,
    lr: float = 1e-3,
    prepare_options: Sequence[str] = (),
    target: str = DEFAULT_TARGET,
) -> dict[str, Any]:
    """Run the recipe end to end; returns the record also written to out_dir/pretrain.json."""
    from data_prep.datamodule import VendorDataModule

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = synthesize_and_prepare(out_dir / "cohort", seed, subjects_per_vendor, prepare_options)
    namespace_subject_ids(prepared, f"pretrain{seed}_")
    disjointness = assert_disjoint(prepared, federated_roots)
    classes = pathology_classes(read_manifest(prepared / "manifest.csv"), target)
    pl.seed_everything(seed, workers=True)
    config = ConvViTConfig.preset(preset, n_classes=len(classes))
    module = PathologyPretrainer(config, classes, lr=lr, target=target)
    data = VendorDataModule(str(prepared), clients=None, batch_size=batch_size, augment=True, seed=seed)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        **QUIET_TRAINER_KWARGS,
        default_root_dir=str(out_dir / "lightning"),
    )
    trainer.fit(module, datamodule=data)
    val_metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val_")}
    test_metrics = {
        key: float(value) for key, value in trainer.test(module, datamodule=data, verbose=False)[0].items()
    }

    weights = save_cinema(downstream_model(module.model, seed), out_dir / WEIGHTS_NAME)
    config_path = out_dir / CONFIG_NAME
    config_path.write_text(
        yaml.safe_dump(cinema_config(preset, config, seed, voxel_spacing(prepared)), sort_keys=False), encoding="utf-8"
    )
    load_cinema(weights, ConvViTConfig.preset(preset, n_classes=len(DOWNSTREAM_CLASSES)))  # the downstream path
    record = {
        "stand_in_for": "CineMA pretrained weights (not downloadable here); NOT CineMA",
        "recipe": "supervised pathology classes, full ConvViT training, separate synthetic cohort",
        "target": target,
        "preset": preset,
        "seed": seed,
        "cohort_seed": seed,
        "subjects_per_vendor": subjects_per_vendor,
        "classes": classes,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "disjoint_from": [str(path) for path in federated_roots],
        "disjointness_checked": disjointness,
        "val": val_metrics,
        "test": test_metrics,
        "weights": weights.name,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "heads": "re-initialised (seeded) for 2 classes NOR / ABN; only the backbone is pretrained",
    }
    (out_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="checkpoint directory (model.safetensors, config.yaml)"
    )
    parser.add_argument("--seed", type=int, required=True, help="seed of the pretraining cohort and of the training")
    parser.add_argument(
        "--disjoint-from",
        type=Path,
        action="append",
        required=True,
        metavar="PREPARED",
        help="a federated cohort's prepared root; no pretraining subject may be in it (repeatable)",
    )
    parser.add_argument("--preset", default="micro", choices=PRESET_NAMES, help="ConvViT preset")
    parser.add_argument("--subjects-per-vendor", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, choices=sorted(PRETRAINING_TARGETS), help="what the backbone learns"
    )
    parser.add_argument(
        "--prepare-option",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument passed to data_prep.prepare, e.g. --prepare-option=--crop=64,64,8",
    )
    args = parser.parse_args(argv)
    record = pretrain(
        args.out,
        args.seed,
        args.disjoint_from,
        args.preset,
        args.subjects_per_vendor,
        args.epochs,
        args.batch_size,
        args.lr,
        args.prepare_option,
        args.target,
    )
    print(json.dumps({key: record[key] for key in ("classes", "val", "test", "weights_sha256")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
