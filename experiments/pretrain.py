"""`python -m experiments.pretrain`: the stand-in for CineMA's weights, pretrained on Siemens-only data (like UKB).

CineMA's weights cannot be downloaded here, and a random backbone carries no signal for a local adapter to re-weight.
This recipe pretrains a ConvViT the way a foundation model is made, on a separate cohort and without the downstream
label:
1. a Siemens-only synthetic cohort (CineMA was pretrained on UK Biobank, which is Siemens only) with its own seed,
   in all the Siemens datasets' layouts, prepared to the stand-in's input geometry;
2. image-derived phenotypes computed from each subject's ED/ES label maps (data_prep/phenotypes.py: volumes,
   ejection fractions, myocardium, wall thickness), as UK Biobank publishes them;
3. full training of the ConvViT to regress the standardised phenotypes through its own heads (MSE), with
   size-preserving augmentation (`--objective groups` classifies structural pathology groups instead);
4. the backbone written in CineMA's checkpoint format with fresh 2-class heads, and a CineMA config.yaml;
5. the bar, on a fresh Siemens-only probe cohort: frozen features, class-balanced logistic regression, 5-fold CV
   (experiments/probe.py), beside a random backbone of the same shape, and the same probe hearts rendered with another
   vendor's profile (the domain shift federated sites see);
6. `record.json`: the exact command, seeds, sha256, probe figures, `prepare_args` and the pretraining volumes'
   digests, so that any federated cohort can be checked disjoint from it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandScaleIntensityd

from data_prep.cohort import Cohort, assert_disjoint, build_cohort, volume_digests
from data_prep.phenotypes import PHENOTYPES, subject_phenotypes
from data_prep.readers import discover
from data_prep.records import LabelRule
from data_prep.report import image_path
from data_prep.report import read_manifest as read_prepared_manifest
from experiments.probe import PATHOLOGY_GROUPS, pathology_group, probe_backbone
from models.atomic_io import write_json_atomic, write_text_atomic
from models.config import PRESET_NAMES, ConvViTConfig
from models.convvit import ConvViT
from models.lit import QUIET_TRAINER_KWARGS
from models.loading import HEAD_PREFIX, load_cinema, save_cinema
from models.standin import CONFIG_NAME, RECORD_NAME, STANDIN_DIR, WEIGHTS_NAME, file_sha256

PHENOTYPES_FILE = "phenotypes.csv"
DOWNSTREAM_CLASSES = ["NOR", "ABN"]
"""Downstream config's class list: 0 = NOR (healthy), 1 = any pathology, like the federated task."""
PRETRAINING_VENDOR = "siemens"
DEFAULT_GEOMETRY = ["--crop", "64", "64", "--spacing", "3", "3", "10", "--depth", "8"]
"""The stand-in's input: 64 x 64 x 8 voxels at 3 x 3 x 10 mm (CineMA's 192 mm in-plane field of view)."""
PRETRAINING_SPLIT = ["--val-fraction", "0.1", "--test-fraction", "0.1"]
OBJECTIVES = ("phenotypes", "groups")
SHIFT_VOXELS = 4


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a prepared root's manifest.csv (every volume inside the root, data_prep.report); an error names the
    file and the missing column."""
    rows = read_prepared_manifest(path)
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


def cohort_phenotypes(raw: Path, prepared: Path) -> dict[str, list[float]]:
    """PHENOTYPES of every prepared subject, computed from its raw ED/ES label maps, by (namespaced) subject id.

    Also written to `<prepared>/../phenotypes.csv` for inspection. A prepared subject without label maps is an error.
    """
    records = {record.subject_id: record for record in discover([raw], LabelRule()).records}
    rows = read_manifest(prepared / "manifest.csv")
    values: dict[str, list[float]] = {}
    for row in rows:
        source_id = row.get("source_subject_id", row["subject_id"])
        if source_id not in records:
            raise ValueError(f"{prepared / 'manifest.csv'}: subject {source_id} is not found under {raw}")
        measured = subject_phenotypes(records[source_id])
        values[row["subject_id"]] = [measured[name] for name in PHENOTYPES]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject_id", *PHENOTYPES])
    writer.writerows([subject, *(f"{v:.4f}" for v in row)] for subject, row in values.items())
    write_text_atomic(prepared.parent / PHENOTYPES_FILE, buffer.getvalue())
    return values


def standardised(values: Mapping[str, list[float]], train_ids: Sequence[str]) -> dict[str, torch.Tensor]:
    """Phenotypes z-scored with the training split's mean and standard deviation."""
    train = np.array([values[subject] for subject in train_ids])
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    return {
        subject: torch.tensor((np.array(row) - mean) / std, dtype=torch.float32) for subject, row in values.items()
    }


def size_preserving(crop: tuple[int, int], seed: int) -> Compose:
    """Pretraining augmentation that keeps every measured size: in-plane flips, z-rotation, shifts of up to
    SHIFT_VOXELS, intensity scale and gamma (CineMA's zoom would change the volumes the targets measure)."""
    transform = Compose(
        [
            RandFlipd(keys="image", prob=0.5, spatial_axis=0),
            RandFlipd(keys="image", prob=0.5, spatial_axis=1),
            RandAffined(
                keys="image",
                prob=0.5,
                rotate_range=(0, 0, np.pi),
                translate_range=(SHIFT_VOXELS, SHIFT_VOXELS, 0),
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", prob=0.5, factors=0.2),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5)),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


class StandInPretrainer(pl.LightningModule):
    """Full ConvViT training on phenotype regression (MSE) or pathology groups (CE), AdamW, warm-up and cosine.

    The model's heads output the phenotypes or the group logits; `downstream_model` replaces them.
    """

    def __init__(
        self,
        config: ConvViTConfig,
        targets: Mapping[str, torch.Tensor],
        groups: Sequence[str],
        objective: str,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: choose one of {OBJECTIVES}")
        self.n_regressed = len(PHENOTYPES) if objective == "phenotypes" else 0
        self.groups = list(groups) if objective == "groups" else []
        self.model = ConvViT(dataclasses.replace(config, n_classes=self.n_regressed + len(self.groups)))
        self.targets = dict(targets)
        self.lr, self.weight_decay = lr, weight_decay
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def _losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total loss, the regression outputs and their targets."""
        outputs = self.model(batch["image"])
        regressed = outputs[:, : self.n_regressed]
        wanted = torch.stack([self.targets[s] for s in batch["subject_id"]]).to(self.device)[:, : self.n_regressed]
        loss = F.mse_loss(regressed, wanted) if self.n_regressed else outputs.new_zeros(())
        if self.groups:
            index = {group: position for position, group in enumerate(self.groups)}
            classes = [
                index[pathology_group(p, s)] for p, s in zip(batch["pathology"], batch["subject_id"], strict=True)
            ]
            loss = loss + F.cross_entropy(outputs[:, self.n_regressed :], torch.tensor(classes, device=self.device))
        return loss, regressed.detach(), wanted

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._losses(batch)
        self.log("train_loss", loss, batch_size=len(batch["subject_id"]))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: Mapping[str, Any]) -> None:
        loss, regressed, wanted = self._losses(batch)
        self.log(f"{stage}_loss", loss, batch_size=len(batch["subject_id"]))
        self._outputs[stage].append((regressed.cpu(), wanted.cpu()))

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self._r2("val"), batch_size=1)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._r2("test"), batch_size=1)

    def _r2(self, stage: str) -> dict[str, float]:
        """Coefficient of determination of each regressed phenotype, and their mean."""
        outputs, self._outputs[stage] = self._outputs[stage], []
        if not outputs or not self.n_regressed:
            return {}
        predicted = torch.cat([o[0] for o in outputs])
        wanted = torch.cat([o[1] for o in outputs])
        residual = ((predicted - wanted) ** 2).sum(0)
        total = ((wanted - wanted.mean(0)) ** 2).sum(0).clamp_min(1e-8)
        r2 = 1.0 - residual / total
        per_phenotype = {f"{stage}_r2_{name}": float(value) for name, value in zip(PHENOTYPES, r2, strict=True)}
        return {f"{stage}_r2_mean": float(r2.mean()), **per_phenotype}

    def configure_optimizers(self) -> dict[str, Any]:
        decayed = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        plain = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": self.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, total // 20)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / warmup) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / total))),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def voxel_spacing(prepared: Path) -> tuple[float, ...]:
    """Voxel spacing (mm) of the prepared volumes, from the first one's NIfTI header."""
    first = read_manifest(prepared / "manifest.csv")[0]
    volume = image_path(prepared / "manifest.csv", first)
    return tuple(float(zoom) for zoom in nib.load(str(volume)).header.get_zooms()[:3])


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


def _print(message: str) -> None:
    print(message, flush=True)


def cohort(
    work: Path, name: str, seed: int, subjects: int, geometry: Sequence[str], profile: str | None = None
) -> Path:
    """A Siemens-only synthetic cohort, prepared to `geometry` (reused when already prepared); its prepared root."""
    siemens_only = Cohort(seed, subjects, vendors=(PRETRAINING_VENDOR,), render_profile=profile)
    return build_cohort(work / name, siemens_only, [*geometry, *PRETRAINING_SPLIT], _print)


def _option(default: Any, help_text: str, **argparse_kwargs: Any) -> Any:
    """A PretrainSettings field that is also an `experiments.pretrain` option (`--batch-size` for batch_size)."""
    return dataclasses.field(default=default, metadata={"help": help_text, **argparse_kwargs})


@dataclasses.dataclass
class PretrainSettings:
    """Everything the stand-in depends on (all of it goes into record.json); each field is a command-line option."""

    seed: int = _option(1000, "seed of the pretraining cohort and of the training")
    subjects: int = _option(400, "Siemens subjects to pretrain on")
    preset: str = _option("mini", "ConvViT preset", choices=PRESET_NAMES)
    objective: str = _option("phenotypes", "what the backbone learns", choices=OBJECTIVES)
    epochs: int = _option(120, "training epochs")
    batch_size: int = _option(8, "training batch size")
    lr: float = _option(1e-3, "AdamW learning rate (5 %% warm-up, then cosine)")
    probe_seed: int = _option(2000, "seed of the fresh Siemens probe cohort")
    probe_subjects: int = _option(200, "subjects of the probe cohort")
    shift_profile: str = _option("ge", "vendor profile the probe hearts are also rendered with")
    geometry: tuple[str, ...] = dataclasses.field(default=tuple(DEFAULT_GEOMETRY), metadata={"fixed": True})
    """The input geometry (data_prep.prepare arguments); fixed by the stand-in's input size, not an option."""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [field for field in dataclasses.fields(cls) if not field.metadata.get("fixed")]


class ProgressLine(pl.Callback):
    """Prints one line after each validated epoch: epoch, training loss, validation R², elapsed time."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % (trainer.check_val_every_n_epoch or 1):
            return
        metrics = trainer.callback_metrics
        loss, r2 = float(metrics.get("train_loss", math.nan)), float(metrics.get("val_r2_mean", math.nan))
        elapsed = time.monotonic() - self.started
        _print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
            f"train loss {loss:.3f}, val R² {r2:.3f}, {elapsed:.0f} s"
        )


def reproducing_command(settings: PretrainSettings, out_dir: Path) -> str:
    """The `python -m experiments.pretrain` command line that makes this stand-in again."""
    arguments = [] if Path(out_dir).resolve() == STANDIN_DIR else ["--out", str(out_dir)]
    for field in PretrainSettings.options():
        arguments += [f"--{field.name.replace('_', '-')}", str(getattr(settings, field.name))]
    return shlex.join(["python", "-m", "experiments.pretrain", *arguments])


def train_backbone(settings: PretrainSettings, prepared: Path, work: Path) -> tuple[ConvViT, dict[str, float]]:
    """Pretrain the ConvViT on the prepared Siemens cohort; returns it and its held-out regression figures."""
    from data_prep.datamodule import VendorDataModule

    rows = read_manifest(prepared / "manifest.csv")
    values = cohort_phenotypes(work / "pretraining" / "raw", prepared)
    targets = standardised(values, [row["subject_id"] for row in rows if row["split"] == "train"])
    groups = sorted({pathology_group(row["pathology"], row["subject_id"]) for row in rows if row["split"] == "train"})
    pl.seed_everything(settings.seed, workers=True)
    config = ConvViTConfig.preset(settings.preset)
    module = StandInPretrainer(config, targets, groups, settings.objective, lr=settings.lr)
    data = VendorDataModule(
        str(prepared), clients=None, batch_size=settings.batch_size, seed=settings.seed, transform=size_preserving
    )
    trainer = pl.Trainer(
        max_epochs=settings.epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        check_val_every_n_epoch=10,
        **QUIET_TRAINER_KWARGS,
        default_root_dir=str(work / "lightning"),
        callbacks=[ProgressLine()],
    )
    trainer.fit(module, datamodule=data)
    figures = {key: round(float(value), 4) for key, value in trainer.callback_metrics.items() if "r2_mean" in key}
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    figures.update({key: round(float(value), 4) for key, value in tested.items() if key.startswith("test_r2")})
    return module.model, figures


def pretrain(out_dir: Path, work: Path, settings: PretrainSettings, disjoint_from: Sequence[Path] = ()) -> dict:
    """Run the recipe end to end; returns the record also written to out_dir/record.json."""
    torch.set_num_threads(2)
    started = time.monotonic()
    geometry = list(settings.geometry)
    prepared = cohort(work, "pretraining", settings.seed, settings.subjects, geometry)
    namespace_subject_ids(prepared, f"pretrain{settings.seed}_")
    probe_root = cohort(work, "probe", settings.probe_seed, settings.probe_subjects, geometry)
    shifted_root = cohort(
        work,
        f"probe_{settings.shift_profile}",
        settings.probe_seed,
        settings.probe_subjects,
        geometry,
        settings.shift_profile,
    )
    digests = volume_digests(prepared)
    disjointness = assert_disjoint(prepared, [probe_root, *disjoint_from], digests)
    trained, regression = train_backbone(settings, prepared, work)
    pretrain_seconds = time.monotonic() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = save_cinema(downstream_model(trained, settings.seed), out_dir / WEIGHTS_NAME)
    config = ConvViTConfig.preset(settings.preset, n_classes=len(DOWNSTREAM_CLASSES))
    yaml_text = yaml.safe_dump(cinema_config(settings.preset, config, settings.seed, voxel_spacing(prepared)))
    write_text_atomic(out_dir / CONFIG_NAME, yaml_text)
    standin = load_cinema(weights, out_dir / CONFIG_NAME)  # exactly the path every downstream user takes
    probe = probe_backbone(standin, probe_root, shifted_root, seed=settings.probe_seed)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        random_probe = probe_backbone(ConvViT(config), probe_root, shifted_root, seed=settings.probe_seed)
    record = {
        "stand_in_for": "CineMA's pretrained weights (not downloadable here); NOT CineMA",
        "recipe": (
            f"full ConvViT training on {settings.objective} of a separate Siemens-only synthetic cohort "
            "(phenotypes computed from the ED/ES label maps), size-preserving augmentation"
        ),
        "command": reproducing_command(settings, out_dir),
        "settings": dataclasses.asdict(settings),
        "seeds": {"pretraining_cohort": settings.seed, "training": settings.seed, "probe_cohort": settings.probe_seed},
        "phenotypes": list(PHENOTYPES),
        "pathology_groups": PATHOLOGY_GROUPS,
        "prepare_args": geometry,
        "weights": WEIGHTS_NAME,
        "weights_sha256": file_sha256(weights),
        "pretraining_seconds": round(pretrain_seconds),
        "pretraining_regression": regression,
        "disjointness_checked": disjointness,
        "probe": {
            "protocol": (
                "frozen features (mean fused patch token + CLS), standardised; class-balanced logistic regression; "
                f"stratified 5-fold CV on a fresh Siemens-only cohort (seed {settings.probe_seed}); shifted = the "
                f"same hearts rendered with the {settings.shift_profile} profile"
            ),
            "standin": probe,
            "random_backbone_same_shape": random_probe,
        },
        "heads": "re-initialised (seeded) for 2 classes NOR / ABN; only the backbone is pretrained",
        "pretraining_volume_sha256": digests,
    }
    write_json_atomic(out_dir / RECORD_NAME, record)
    return record


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, PretrainSettings]:
    """The command line's paths and the settings it gives (every PretrainSettings option, by its field name)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STANDIN_DIR, help="where model.safetensors, config.yaml go")
    parser.add_argument("--work", type=Path, default=Path("runs/standin"), help="cohorts and training logs")
    for field in PretrainSettings.options():
        extra = {key: value for key, value in field.metadata.items() if key != "help"}
        flag = f"--{field.name.replace('_', '-')}"
        parser.add_argument(
            flag, type=type(field.default), default=field.default, help=field.metadata["help"], **extra
        )
    parser.add_argument(
        "--disjoint-from",
        type=Path,
        action="append",
        default=[],
        metavar="PREPARED",
        help="another prepared root that must share no subject with the pretraining cohort (repeatable)",
    )
    args = parser.parse_args(argv)
    return args, PretrainSettings(**{field.name: getattr(args, field.name) for field in PretrainSettings.options()})


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_arguments(argv)
    record = pretrain(args.out, args.work, settings, args.disjoint_from)
    print({key: record[key] for key in ("weights_sha256", "pretraining_seconds", "pretraining_regression")})
    print("stand-in probe:", record["probe"]["standin"])
    print("random backbone probe:", record["probe"]["random_backbone_same_shape"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
