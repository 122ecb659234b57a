"""Lightning DataModule over a prepared root: one client, a list of clients or all pooled; volumes cached in memory."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised, ScaleIntensityd
from monai.utils import convert_to_tensor
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from data_prep.preprocess import read_volume, to_uint8
from data_prep.report import image_path, read_manifest
from data_prep.splits import MANIFEST_SPLITS, SPLITS
from models.dp import private_generator
from models.protocol import DATA_ENV, MIN_TRAIN_SUBJECTS

# CineMA classification augmentation (reference-cinema.md §3), defined for a 192-voxel crop.
CINEMA_CROP = 192
CINEMA_TRANSLATE = 60
AUGMENT_PROB = 0.5


def training_transform(crop: tuple[int, int], seed: int) -> Compose:
    """CineMA's training recipe on an image (2, X, Y, Z): gamma, noise, rescale, z-rotation/translation/scale.

    The translation range is scaled from CineMA's 60 voxels at 192 to the configured crop.
    """
    translate = (CINEMA_TRANSLATE * crop[0] / CINEMA_CROP, CINEMA_TRANSLATE * crop[1] / CINEMA_CROP, 0)
    transform = Compose(
        [
            RandAdjustContrastd(keys="image", prob=AUGMENT_PROB, gamma=(0.5, 1.5)),
            RandGaussianNoised(keys="image", prob=AUGMENT_PROB),
            ScaleIntensityd(keys="image"),
            RandAffined(
                keys="image",
                prob=AUGMENT_PROB,
                rotate_range=(0, 0, np.pi),
                translate_range=translate,
                scale_range=(0.2, 0.2, 0.0),
                mode="bilinear",
                padding_mode="zeros",
            ),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


class CachedVolumes(Dataset):
    """Manifest rows with their volumes held in memory as uint8 (read once, at construction)."""

    def __init__(self, root: Path, rows: Sequence[dict[str, str]], transform: Compose | None) -> None:
        self.rows = list(rows)
        self.volumes = [to_uint8(read_volume(image_path(root / "manifest.csv", row))) for row in self.rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, object]:
        row = self.rows[index]
        image = torch.from_numpy(self.volumes[index].astype(np.float32) / 255.0)
        if self.transform is not None:
            augmented = self.transform({"image": image})["image"]
            image = convert_to_tensor(augmented, dtype=torch.float32, track_meta=False).clamp_(0.0, 1.0)
        return {
            "image": image,
            "label": torch.tensor(int(row["label"]), dtype=torch.int64),
            "subject_id": row["subject_id"],
            "client": row["client"],
            "pathology": row["pathology"],
        }


def _collate_or_empty(image_shape: tuple[int, ...], samples: list[dict[str, object]]) -> dict[str, object]:
    """torch's collation, and for an empty Poisson batch the batch of no subject (DP-SGD still steps on it)."""
    if samples:
        return default_collate(samples)
    return {
        "image": torch.zeros((0, *image_shape), dtype=torch.float32),
        "label": torch.zeros(0, dtype=torch.int64),
        "subject_id": [],
        "client": [],
        "pathology": [],
    }


def _seed_worker_transform(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from the loader's seeded base seed."""
    info = get_worker_info()
    if info is not None and info.dataset.transform is not None:
        info.dataset.transform.set_random_state(seed=torch.initial_seed() % 2**32)


class VendorDataModule(L.LightningDataModule):
    """Train/val/test loaders for one site (`clients=["ge"]`), several, or all pooled (`clients=None`).

    `transform(crop, seed)` builds the training augmentation (default: CineMA's recipe, `training_transform`).
    A root may hold extra evaluation splits (e.g. test_siemens of a benchmark root): `has_split` and
    `split_dataloader` reach them; the train/val/test loaders never include them.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        clients: str | Sequence[str] | None = None,
        batch_size: int = 2,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        transform: Callable[[tuple[int, int], int], Compose] = training_transform,
        poisson_sampling: bool = False,
    ) -> None:
        """`poisson_sampling`: each training subject joins each batch independently with probability batch_size /
        n (DP-SGD's sampling; batches vary in size and may be empty), for n / batch_size batches an epoch, drawn
        from a generator the run seed does not determine (models.dp.private_generator)."""
        super().__init__()
        if root is None:
            root = os.environ.get(DATA_ENV)
            if not root:
                raise ValueError(f"no prepared data root: pass root= or set the environment variable {DATA_ENV}")
        self.root = Path(root)
        manifest = self.root / "manifest.csv"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: run `python -m data_prep.prepare` to create it")
        rows = read_manifest(manifest)
        available = sorted({row["client"] for row in rows})
        wanted = [clients] if isinstance(clients, str) else list(clients) if clients is not None else available
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise ValueError(f"client(s) {unknown} not in {manifest} (available: {available})")
        self.clients = wanted
        self.rows = {split: [r for r in rows if r["client"] in wanted and r["split"] == split] for split in SPLITS}
        extra = sorted({r["split"] for r in rows} - set(SPLITS))
        self.extra_rows = {
            split: [r for r in rows if r["client"] in wanted and r["split"] == split] for split in extra
        }
        self.batch_size = batch_size
        self.augment = augment
        self.transform = transform
        self.num_workers = num_workers
        self.seed = seed
        self.poisson_sampling = poisson_sampling
        self.datasets: dict[str, CachedVolumes] = {}

    @property
    def num_train_samples(self) -> int:
        """Number of training subjects (the sample count a federated client reports)."""
        return len(self.rows["train"])

    @property
    def train_class_counts(self) -> list[int]:
        """Training subjects per label: [healthy, diseased]."""
        labels = [int(row["label"]) for row in self.rows["train"]]
        return [labels.count(0), labels.count(1)]

    def split_problems(self, need_both_classes: bool = False) -> list[str]:
        """Why these clients' splits cannot train and evaluate a model (empty when they can): no validation or
        test subject, fewer than MIN_TRAIN_SUBJECTS training subjects, or (`need_both_classes`, for a
        class-balanced loss) a training split without a healthy or without a diseased subject."""
        problems = [f"no {split} subjects" for split in ("val", "test") if not self.rows[split]]
        if len(self.rows["train"]) < MIN_TRAIN_SUBJECTS:
            problems.append(f"{len(self.rows['train'])} training subject(s), fewer than {MIN_TRAIN_SUBJECTS}")
        healthy, diseased = self.train_class_counts
        if need_both_classes and not (healthy and diseased):
            problems.append(f"training split has {healthy} healthy and {diseased} diseased subjects: both are needed")
        return problems

    def require_usable_splits(self, need_both_classes: bool = False) -> None:
        """Fail before any training, naming the clients and the manifest, when `split_problems` finds something."""
        problems = self.split_problems(need_both_classes)
        if problems:
            raise ValueError(
                f"client(s) {', '.join(self.clients)} in {self.root / 'manifest.csv'}: "
                + "; ".join(problems)
                + " (see the warnings of data_prep.prepare, and its --val-fraction / --test-fraction)"
            )

    def setup(self, stage: str | None = None) -> None:
        """Read every volume of the selected clients once; later epochs never touch the files again."""
        for split in SPLITS:
            if split in self.datasets:
                continue
            transform = None
            if split == "train" and self.augment and self.rows["train"]:
                first = read_volume(image_path(self.root / "manifest.csv", self.rows["train"][0]))
                transform = self.transform((first.shape[1], first.shape[2]), self.seed)
            self.datasets[split] = CachedVolumes(self.root, self.rows[split], transform)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            worker_init_fn=_seed_worker_transform,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        if self.poisson_sampling:
            return self._poisson_loader()
        return self._loader("train", shuffle=True)

    def _poisson_loader(self) -> DataLoader:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # imported only for DP-SGD

        if "train" not in self.datasets:
            self.setup()
        dataset = self.datasets["train"]
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset),
            sample_rate=self.batch_size / len(dataset),
            generator=private_generator(),  # not the run seed: who is in a batch must stay secret
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=partial(_collate_or_empty, dataset.volumes[0].shape),
            num_workers=self.num_workers,
            worker_init_fn=_seed_worker_transform,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def has_split(self, name: str) -> bool:
        """Whether the selected clients have subjects in split `name` (train, val, test or an extra split)."""
        return bool(self.rows.get(name) or self.extra_rows.get(name))

    def split_dataloader(self, name: str) -> DataLoader:
        """An evaluation loader (unshuffled, never augmented) of split `name`: val, test or an extra split such as
        test_siemens; its volumes are read on the first call. ValueError when the clients have no such subjects."""
        if name == "train":
            raise ValueError("split_dataloader gives evaluation loaders; use train_dataloader for the train split")
        if name not in MANIFEST_SPLITS or not self.has_split(name):
            raise ValueError(
                f"split {name!r}: no subjects of client(s) {', '.join(self.clients)} in {self.root / 'manifest.csv'} "
                f"(splits there: {', '.join(s for s in MANIFEST_SPLITS if self.has_split(s)) or 'none'})"
            )
        if name in self.extra_rows and name not in self.datasets:
            self.datasets[name] = CachedVolumes(self.root, self.extra_rows[name], None)
        return self._loader(name, shuffle=False)
