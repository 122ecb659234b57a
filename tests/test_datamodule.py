"""VendorDataModule: batches as in interfaces.md, client selection, env default, determinism, caching, augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.datamodule import VendorDataModule
from data_prep.preprocess import read_volume
from data_prep.report import read_manifest
from models.protocol import DATA_ENV


def _first_batch(module: VendorDataModule, split: str = "train") -> dict:
    module.setup("fit")
    loader = {"train": module.train_dataloader, "val": module.val_dataloader, "test": module.test_dataloader}[split]
    return next(iter(loader()))


def test_batch_matches_the_interface(prepared_root: Path) -> None:
    batch = _first_batch(VendorDataModule(prepared_root, clients=["ge"], batch_size=2))
    assert batch["image"].shape == (2, 2, 64, 64, 8) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
    assert batch["client"] == ["ge", "ge"] and len(batch["subject_id"]) == 2 and len(batch["pathology"]) == 2


def test_one_site_and_pooled_counts_follow_the_manifest(prepared_root: Path) -> None:
    rows = read_manifest(prepared_root / "manifest.csv")
    site = VendorDataModule(prepared_root, clients="canon")
    train = [r for r in rows if r["client"] == "canon" and r["split"] == "train"]
    assert site.num_train_samples == len(train)
    assert site.train_class_counts == [sum(r["label"] == "0" for r in train), sum(r["label"] == "1" for r in train)]
    pooled = VendorDataModule(prepared_root)
    assert pooled.num_train_samples == sum(r["split"] == "train" for r in rows)
    assert set(pooled.clients) == {"siemens", "philips", "ge", "canon"}
    pair = VendorDataModule(prepared_root, clients=["ge", "canon"])
    assert pair.num_train_samples == sum(r["split"] == "train" and r["client"] in ("ge", "canon") for r in rows)


def test_root_from_environment_and_clear_errors(prepared_root: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(prepared_root))
    assert VendorDataModule(clients="ge").root == prepared_root
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(ValueError, match=DATA_ENV):
        VendorDataModule()
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        VendorDataModule(tmp_path)
    with pytest.raises(ValueError, match="not in"):
        VendorDataModule(prepared_root, clients="toshiba")


def test_same_seed_same_batches_other_seed_differs(prepared_root: Path) -> None:
    first = _first_batch(VendorDataModule(prepared_root, clients="philips", seed=4))
    again = _first_batch(VendorDataModule(prepared_root, clients="philips", seed=4))
    other = _first_batch(VendorDataModule(prepared_root, clients="philips", seed=5))
    assert first["subject_id"] == again["subject_id"] and torch.equal(first["image"], again["image"])
    assert not torch.equal(first["image"], other["image"])


def test_augmentation_only_for_training(prepared_root: Path) -> None:
    def stored(batch: dict) -> torch.Tensor:
        row = {r["subject_id"]: r for r in read_manifest(prepared_root / "manifest.csv")}
        return torch.stack(
            [torch.from_numpy(read_volume(prepared_root / row[s]["image"])) for s in batch["subject_id"]]
        )

    plain = _first_batch(VendorDataModule(prepared_root, clients="ge", augment=False))
    assert torch.allclose(plain["image"], stored(plain), atol=1e-6)
    for split in ("val", "test"):
        batch = _first_batch(VendorDataModule(prepared_root, clients="ge"), split)
        assert torch.allclose(batch["image"], stored(batch), atol=1e-6)
    module = VendorDataModule(prepared_root, clients="ge", batch_size=1)
    module.setup("fit")
    changed = [
        not torch.allclose(b["image"], stored(b), atol=1e-6) for _ in range(3) for b in module.train_dataloader()
    ]
    assert any(changed)


def test_volumes_are_read_once(prepared_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(prepared_root, root)
    module = VendorDataModule(root, clients="siemens", augment=False)
    module.setup("fit")
    shutil.rmtree(root / "volumes")
    for _ in range(2):
        labels = torch.cat([batch["label"] for batch in module.train_dataloader()])
        assert len(labels) == module.num_train_samples
    assert np.bincount(labels.numpy(), minlength=2).tolist() == module.train_class_counts
