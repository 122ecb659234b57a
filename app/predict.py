"""`python -m app.predict`: score unlabelled ED/ES studies with an exported model (models.export) as training saw them.

One study: `--ed ED.nii.gz --es ES.nii.gz --out OUT.json` (or .csv); many: `--studies CSV` (columns study_id, ed,
es and optionally ed_label; relative paths are relative to the CSV's folder). Each study goes through
data_prep.preprocess with the model's input contract and the scaled-uint8 round trip of a prepared volume, then
through the module's `predict_step`. Bad input exits with code 2 and one line `error: ...` naming the file and
the field.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from data_prep.datamodule import CachedVolumes
from data_prep.preprocess import Geometry, preprocess, write_volume
from data_prep.records import FrameRef, InputError, SubjectRecord
from data_prep.report import write_csv_atomic
from models.atomic_io import write_json_atomic
from models.dual_lora import backbone_of
from models.export import METADATA_FILE, BackboneMismatchError, ModelFormatError, load_model
from models.lit import DECISION_RULE, QUIET_TRAINER_KWARGS, DualLoRAClassifier

STUDY_COLUMNS = ("study_id", "ed", "es")
OPTIONAL_COLUMNS = ("ed_label",)
OUTPUT_COLUMNS = ("study_id", "p_diseased", "diseased", "threshold", "model")
INPUT_LAYOUTS = ("cinema", "raw")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
LIGHTNING_PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
"""Lightning 2.6 on torch 2.13 warns on every predict batch; nothing for a user to act on."""


@dataclass(frozen=True)
class Study:
    """One unlabelled study: its id, ED and ES frames and an optional ED label map (LV = 3)."""

    study_id: str
    ed: Path
    es: Path
    ed_label: Path | None = None


class _Studies(Dataset):
    """Prepared volumes as `predict_step` batches them: `{"image", "study_id"}`."""

    def __init__(self, volumes: CachedVolumes) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.volumes[index]
        return {"image": item["image"], "study_id": item["subject_id"]}


def study_id_of(ed: Path) -> str:
    """The default study id: the ED file's name without its NIfTI suffix and its `_sax_ed` / `_ed` ending
    (`p42_sax_ed.nii.gz` -> `p42`); the folder's name when nothing is left (`acdc/sax_ed.nii.gz` -> `acdc`)."""
    name = ed.name
    stem = next((name[: -len(suffix)] for suffix in NIFTI_SUFFIXES if name.endswith(suffix)), name)
    for ending in ("sax_ed", "ed"):
        if stem.lower().endswith(ending):
            stem = stem[: -len(ending)].rstrip("_-.")
            break
    return stem or ed.resolve().parent.name


def read_studies(path: Path) -> list[Study]:
    """The studies of a CSV (study_id, ed, es[, ed_label]); paths relative to the CSV's folder."""
    if not path.is_file():
        raise InputError(path, "studies CSV is missing")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    missing = [column for column in STUDY_COLUMNS if column not in header]
    if missing:
        raise InputError(path, f"missing column(s) {missing} (required: {', '.join(STUDY_COLUMNS)}; found {header})")
    studies: list[Study] = []
    for number, row in enumerate(rows, start=2):
        empty = [column for column in STUDY_COLUMNS if not (row.get(column) or "").strip()]
        if empty:
            raise InputError(path, f"line {number}: empty field(s) {empty}")
        label = (row.get("ed_label") or "").strip()
        studies.append(
            Study(
                row["study_id"].strip(),
                path.parent / row["ed"].strip(),
                path.parent / row["es"].strip(),
                path.parent / label if label else None,
            )
        )
    if not studies:
        raise InputError(path, "no study rows")
    seen: set[str] = set()
    for study in studies:
        if study.study_id in seen:
            raise InputError(path, f"field study_id: {study.study_id!r} appears twice")
        seen.add(study.study_id)
    return studies


def model_geometry(module: DualLoRAClassifier, model_dir: Path) -> Geometry:
    """The preprocessing geometry of the model's recorded input contract."""
    where = model_dir / METADATA_FILE
    contract = module.export_metadata.get("input_contract")
    if not isinstance(contract, Mapping):
        raise ModelFormatError(f"{where}: missing field input_contract (needed to preprocess a study)")
    try:
        shape = [int(v) for v in contract["spatial_shape"]]
        spacing = tuple(float(v) for v in contract["spacing_mm"])
        return Geometry(crop=(shape[0], shape[1]), spacing=spacing, depth=shape[2])
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ModelFormatError(
            f"{where}: field input_contract needs spatial_shape [x, y, z] and spacing_mm [x, y, z] ({error})"
        ) from error


def _record(study: Study, layout: str) -> SubjectRecord:
    return SubjectRecord(
        pid=study.study_id,
        dataset="predict",
        vendor="unknown",
        centre="",
        pathology="",
        label=-1,
        ed_image=FrameRef(study.ed),
        es_image=FrameRef(study.es),
        ed_label=FrameRef(study.ed_label) if study.ed_label is not None else None,
        layout=layout,
        source=study.ed.parent,
    )


def prepare_studies(
    studies: Sequence[Study], geometry: Geometry, layout: str, model_shape: Sequence[int]
) -> CachedVolumes:
    """Preprocess each study as data_prep.prepare does, write it as a prepared volume, and read it back as the
    datamodule does (scaled uint8): the images are those training and evaluation saw."""
    with tempfile.TemporaryDirectory(prefix="med-duallora-predict-") as folder:
        root = Path(folder)
        rows = []
        for index, study in enumerate(studies):
            prepared = preprocess(_record(study, layout), geometry)
            if list(prepared.volume.shape[:3]) != list(model_shape):
                raise InputError(
                    study.ed,
                    f"preprocessed to {list(prepared.volume.shape[:3])}, the model takes {list(model_shape)} "
                    "(model metadata.json field input_contract.spatial_shape)",
                )
            relative = f"volumes/{index:06d}.nii.gz"
            write_volume(prepared, root / relative)
            rows.append(
                {"subject_id": study.study_id, "image": relative, "label": "-1", "client": "predict", "pathology": ""}
            )
        return CachedVolumes(root, rows, None)


def predict(
    model_dir: Path,
    studies: Sequence[Study],
    weights: str | None = None,
    force: bool = False,
    layout: str = "cinema",
    batch_size: int = 4,
) -> tuple[DualLoRAClassifier, list[dict[str, Any]]]:
    """The loaded model and one output row per study (OUTPUT_COLUMNS)."""
    module = load_model(model_dir, weights=weights, force=force)
    geometry = model_geometry(module, model_dir)
    volumes = prepare_studies(studies, geometry, layout, backbone_of(module.model).config.image_size)
    loader = DataLoader(_Studies(volumes), batch_size=batch_size, shuffle=False)
    trainer = pl.Trainer(accelerator="auto", devices=1, **QUIET_TRAINER_KWARGS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LIGHTNING_PYTREE_WARNING, category=FutureWarning)
        batches = trainer.predict(module, dataloaders=loader)
    threshold = module.thresholds["model"]
    rows = [
        {**prediction, "threshold": threshold, "model": str(model_dir)} for batch in batches for prediction in batch
    ]
    return module, rows


def write_output(path: Path, module: DualLoRAClassifier, rows: list[dict[str, Any]], layout: str) -> None:
    """CSV (OUTPUT_COLUMNS) or JSON (the rows plus the model's kind, site and policy), atomically."""
    if path.suffix == ".csv":
        write_csv_atomic(path, OUTPUT_COLUMNS, rows)
        return
    metadata = module.export_metadata
    write_json_atomic(
        path,
        {
            "model": rows[0]["model"] if rows else None,
            "kind": metadata.get("kind"),
            "site": metadata.get("site"),
            "policy": metadata["policy"]["name"],
            "threshold": module.thresholds["model"],
            "decision_rule": DECISION_RULE,
            "input": layout,
            "predictions": rows,
        },
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m app.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="exported model folder (has metadata.json)")
    parser.add_argument(
        "--weights", default=None, help="backbone weights: standin, random or a file (default: recorded)"
    )
    parser.add_argument(
        "--force", action="store_true", help="use --weights even when their sha256 is not the recorded one"
    )
    parser.add_argument("--ed", type=Path, help="ED frame of one study (.nii.gz)")
    parser.add_argument("--es", type=Path, help="ES frame of one study (.nii.gz)")
    parser.add_argument(
        "--ed-label", type=Path, help="ED label map of that study (LV = 3): centres the crop on the LV"
    )
    parser.add_argument("--study-id", help="id of that study (default: the ED file name without suffix)")
    parser.add_argument("--studies", type=Path, help="CSV of studies: study_id,ed,es[,ed_label]")
    parser.add_argument(
        "--input",
        choices=INPUT_LAYOUTS,
        default="cinema",
        help="cinema: CineMA-preprocessed, heart-centred (crop at the centre, min-max); raw: scanner NIfTI "
        "(crop on the ED-ES motion, percentile normalisation)",
    )
    parser.add_argument("--out", type=Path, required=True, help="predictions to write: .csv or .json")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    single = args.ed is not None or args.es is not None
    if single == (args.studies is not None):
        parser.error("give either --ed and --es (one study) or --studies CSV")
    if single and (args.ed is None or args.es is None):
        parser.error("one study needs both --ed and --es")
    if args.studies is not None and (args.ed_label is not None or args.study_id is not None):
        parser.error("--ed-label and --study-id are for one study; a studies CSV has the columns ed_label, study_id")
    if args.out.suffix not in (".csv", ".json"):
        parser.error(f"--out {args.out}: must end in .csv or .json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, 2 with one `error:` line on bad input."""
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no accelerator banner
    try:
        if args.studies is not None:
            studies = read_studies(args.studies)
        else:
            studies = [Study(args.study_id or study_id_of(args.ed), args.ed, args.es, args.ed_label)]
        module, rows = predict(args.model, studies, args.weights, args.force, args.input, args.batch_size)
        write_output(args.out, module, rows, args.input)
    except BackboneMismatchError as error:
        print(f"error: {error.detail}; pass --force to use these weights anyway", file=sys.stderr)
        return 2
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"{len(rows)} prediction(s) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
