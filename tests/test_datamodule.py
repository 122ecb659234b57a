"""VendorDataModule: batches as in interfaces.md, client selection, env default, determinism, caching, augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.cohort import volume_digests
from data_prep.datamodule import VendorDataModule
from data_prep.preprocess import read_volume
from data_prep.report import image_path, read_manifest, write_csv_atomic
from data_prep.splits import REFERENCE_SUFFIX, REFERENCE_TEST_SPLIT
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


def _copy_with_first_image(prepared_root: Path, destination: Path, image: str | None = None) -> dict[str, str]:
    """Copy the prepared root; optionally rewrite the first manifest row's `image`. Returns that (original) row."""
    shutil.copytree(prepared_root, destination)
    manifest = destination / "manifest.csv"
    header, first, *rest = manifest.read_text(encoding="utf-8").splitlines()
    row = dict(zip(header.split(","), first.split(","), strict=True))
    if image is not None:
        first = first.replace(f",{row['image']},", f",{image},")
        manifest.write_text("\n".join([header, first, *rest]) + "\n", encoding="utf-8")
    return row


def _link_out(root: Path, row: dict[str, str]) -> None:
    """Replace the row's volume by a symbolic link to a copy outside the data root."""
    outside = root.parent / "outside.nii.gz"
    shutil.copy(root / row["image"], outside)
    (root / row["image"]).unlink()
    (root / row["image"]).symlink_to(outside)


def _link_loop(root: Path, row: dict[str, str]) -> None:
    """Replace the row's volume by a symbolic link to a sibling that links back to it."""
    volume = root / row["image"]
    volume.unlink()
    volume.symlink_to("partner.nii.gz")
    volume.with_name("partner.nii.gz").symlink_to(volume.name)


ESCAPES = {
    "parent folders": ("../../etc/passwd", None),
    "absolute path": ("/etc/passwd", None),
    "empty": ("", None),
    "symbolic link out of the root": (None, _link_out),
    "symbolic link loop": (None, _link_loop),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_manifest_image_outside_the_data_root_is_refused(prepared_root: Path, tmp_path: Path, case: str) -> None:
    image, breaker = ESCAPES[case]
    root = tmp_path / "copy"
    row = _copy_with_first_image(prepared_root, root, image)
    if breaker is not None:
        breaker(root, row)
    expected = rf"{root / 'manifest.csv'}: row subject_id='{row['subject_id']}', field image="
    with pytest.raises(ValueError, match=expected):
        VendorDataModule(root, clients=row["client"])
    with pytest.raises(ValueError, match="outside the data root|empty volume path|cannot resolve"):
        read_manifest(root / "manifest.csv")
    with pytest.raises(ValueError, match="field image="):
        volume_digests(root)


def test_links_inside_the_data_root_are_followed(prepared_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    row = _copy_with_first_image(prepared_root, root)
    target = root / "volumes" / "elsewhere.nii.gz"
    (root / row["image"]).rename(target)
    (root / row["image"]).symlink_to(target)
    (tmp_path / "root_link").symlink_to(root)
    module = VendorDataModule(tmp_path / "root_link", clients=row["client"], augment=False)
    module.setup("fit")
    assert image_path(tmp_path / "root_link" / "manifest.csv", row) == target.resolve()


def _with_reference_split(prepared_root: Path, root: Path) -> list[str]:
    """Copy the prepared root and add a test_siemens row per ge test subject (same volume); returns their ids."""
    shutil.copytree(prepared_root, root)
    manifest = root / "manifest.csv"
    rows = read_manifest(manifest)
    extra = [
        {**row, "subject_id": row["subject_id"] + REFERENCE_SUFFIX, "split": REFERENCE_TEST_SPLIT}
        for row in rows
        if row["client"] == "ge" and row["split"] == "test"
    ]
    write_csv_atomic(manifest, list(rows[0]), [*rows, *extra])
    return [row["subject_id"] for row in extra]


def test_extra_split_has_its_own_loader_and_leaves_the_others_alone(prepared_root: Path, tmp_path: Path) -> None:
    reference_ids = _with_reference_split(prepared_root, tmp_path / "copy")
    plain = VendorDataModule(prepared_root, clients="ge", augment=False)
    module = VendorDataModule(tmp_path / "copy", clients="ge", augment=False)
    assert module.rows == plain.rows and not plain.has_split(REFERENCE_TEST_SPLIT)
    assert module.has_split(REFERENCE_TEST_SPLIT) and module.has_split("test") and not module.has_split("holdout")
    assert not VendorDataModule(tmp_path / "copy", clients="canon").has_split(REFERENCE_TEST_SPLIT)
    batches = list(module.split_dataloader(REFERENCE_TEST_SPLIT))
    assert [s for batch in batches for s in batch["subject_id"]] == reference_ids
    tests = list(module.split_dataloader("test"))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, tests, strict=True))
    module.setup("fit")
    loaders = (module.train_dataloader, module.val_dataloader, module.test_dataloader)
    seen = {s for loader in loaders for batch in loader() for s in batch["subject_id"]}
    assert not seen & set(reference_ids)


@pytest.mark.parametrize(("split", "message"), [("train", "train_dataloader"), ("holdout", "no subjects")])
def test_split_loader_refuses_training_and_absent_splits(prepared_root: Path, split: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VendorDataModule(prepared_root, clients="ge").split_dataloader(split)
    with pytest.raises(ValueError, match=f"{prepared_root / 'manifest.csv'}"):
        VendorDataModule(prepared_root, clients="ge").split_dataloader(REFERENCE_TEST_SPLIT)
