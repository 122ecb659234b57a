"""The committed stand-in backbone: files match the record, load strictly like CineMA weights, passed the bar; the
recipe that makes it runs end to end and is deterministic."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from experiments.pretrain import PretrainSettings, parse_arguments, pretrain
from models.config import ConvViTConfig
from models.loading import load_cinema
from models.standin import (
    CONFIG_NAME,
    RECORD_NAME,
    STANDIN_DIR,
    WEIGHTS_NAME,
    file_sha256,
    prepare_args,
    read_record,
    resolve_backbone,
    standin_files,
)

BAR = {"auroc": 0.85, "group_macro_recall": 0.60}
"""Issue #9's bar: frozen features, class-balanced logistic regression, 5-fold CV, held-out Siemens subjects."""


def test_committed_files_match_the_record_and_load_strictly():
    record = read_record()
    weights, config = standin_files()
    assert file_sha256(weights) == record["weights_sha256"]
    assert weights.stat().st_size < 8 * 1024**2
    model = load_cinema(weights, config)
    assert model.config == ConvViTConfig.from_cinema_yaml(config) and model.config.n_classes == 2
    assert yaml.safe_load(config.read_text())["model"]["convvit"]["size"] == record["settings"]["preset"]
    command = shlex.split(record["command"])
    assert command[:3] == ["python", "-m", "experiments.pretrain"]
    args, settings = parse_arguments(command[3:])
    assert dataclasses.asdict(settings) == {**record["settings"], "geometry": tuple(record["settings"]["geometry"])}
    assert args.out == STANDIN_DIR  # the command writes where the committed files are
    assert set(record["seeds"]) == {"pretraining_cohort", "training", "probe_cohort"}
    assert prepare_args() == record["prepare_args"] and "--spacing" in record["prepare_args"]
    assert len(record["pretraining_volume_sha256"]) >= 400


def test_committed_standin_passed_the_bar_and_beats_a_random_backbone():
    probe = read_record()["probe"]
    standin, random = probe["standin"], probe["random_backbone_same_shape"]
    for metric, floor in BAR.items():
        assert standin[metric] >= floor, (metric, standin)
        assert standin[metric] > random[metric] + 0.1, (metric, standin, random)
    assert standin["n_subjects"] >= 150 and set(standin["groups"]) >= {"NOR", "LV_DILATED", "LV_HYPERTROPHY"}
    assert "shifted_transfer" in standin and "shifted_cv" in standin


def test_a_tampered_standin_is_refused_naming_the_file(tmp_path: Path):
    copy = tmp_path / "standin"
    shutil.copytree(STANDIN_DIR, copy)
    data = bytearray((copy / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (copy / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: sha256 differs"):
        standin_files(copy)
    record = json.loads((copy / RECORD_NAME).read_text())
    del record["prepare_args"]
    (copy / RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"{RECORD_NAME}: field.*prepare_args"):
        standin_files(copy)
    (copy / RECORD_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=RECORD_NAME):
        standin_files(copy)


def test_the_standin_token_resolves_to_its_files_and_takes_no_other_config():
    weights, config = resolve_backbone("standin")
    assert Path(weights) == STANDIN_DIR / WEIGHTS_NAME and Path(config) == STANDIN_DIR / CONFIG_NAME
    assert resolve_backbone("random") == (None, None)
    with pytest.raises(ValueError, match="its own config"):
        resolve_backbone("standin", "other.yaml")


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_and_is_deterministic(tmp_path: Path):
    """The real recipe on a tiny Siemens cohort (1 epoch, micro): same seed, same checkpoint, bit for bit."""
    settings = PretrainSettings(subjects=12, preset="micro", epochs=1, batch_size=4, probe_subjects=60)
    first = pretrain(tmp_path / "a", tmp_path / "work", settings)
    second = pretrain(tmp_path / "b", tmp_path / "work", settings)  # the cohorts are reused, training is redone
    assert first["weights_sha256"] == second["weights_sha256"] == file_sha256(tmp_path / "a" / WEIGHTS_NAME)
    assert first["disjointness_checked"] == {"pretraining_subjects": 12, "cohorts_checked": 1}
    record = read_record(tmp_path / "a")
    assert record["prepare_args"] == list(settings.geometry)
    assert 0.0 <= record["probe"]["standin"]["auroc"] <= 1.0
    loaded = load_cinema(tmp_path / "a" / WEIGHTS_NAME, tmp_path / "a" / CONFIG_NAME)
    assert torch.isfinite(loaded(torch.rand(1, 2, 64, 64, 8))).all()
