"""The committed stand-in foundation model (models/pretrained/standin/): its files, record and integrity check.

It stands in for CineMA's pretrained weights, which cannot be downloaded here; `python -m experiments.pretrain`
makes it.
Site scripts and jobs name it with the token `standin` instead of a path, so a job folder carries no path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STANDIN_DIR = Path(__file__).resolve().parent / "pretrained" / "standin"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
RECORD_NAME = "record.json"
STANDIN = "standin"
"""The `--weights` token for the committed stand-in."""
RANDOM = "random"
"""The `--weights` token for a randomly initialised backbone (an explicit choice, never a fallback)."""
RECORD_FIELDS = ("command", "seeds", "weights_sha256", "probe", "prepare_args", "pretraining_volume_sha256")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_record(directory: Path = STANDIN_DIR) -> dict[str, Any]:
    """The stand-in's record.json; a missing file or field is an error naming it."""
    path = Path(directory) / RECORD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stand-in record (`python -m experiments.pretrain` makes one)")
    record = json.loads(path.read_text(encoding="utf-8"))
    missing = [field for field in RECORD_FIELDS if field not in record]
    if missing:
        raise ValueError(f"{path}: field(s) {missing} missing")
    return record


def standin_files(directory: Path = STANDIN_DIR) -> tuple[Path, Path]:
    """(weights, config.yaml) of the stand-in, after checking the weights against the record's sha256."""
    directory = Path(directory)
    record = read_record(directory)
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: stand-in file missing")
    if file_sha256(weights) != record["weights_sha256"]:
        raise ValueError(f"{weights}: sha256 differs from weights_sha256 in {directory / RECORD_NAME}")
    return weights, config


def prepare_args(directory: Path = STANDIN_DIR) -> list[str]:
    """The `data_prep.prepare` arguments that give the stand-in's input geometry."""
    return [str(arg) for arg in read_record(directory)["prepare_args"]]


def resolve_backbone(weights: str | None, cinema_config: str | None = None) -> tuple[str | None, str | None]:
    """(weights file, config.yaml) for a `weights` argument: the token `standin` gives the stand-in's checked files
    (a config may not be given with it), `random` or None gives no weights, anything else is a path kept as is."""
    if weights == STANDIN:
        if cinema_config is not None:
            raise ValueError(f"weights={STANDIN!r} comes with its own config.yaml; do not give cinema_config")
        weights_path, config = standin_files()
        return str(weights_path), str(config)
    return (None if weights == RANDOM else weights), cinema_config
