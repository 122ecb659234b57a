"""A CineMA fine-tuned checkpoint with another head (e.g. ACDC's 5 classes) loads into a binary model, head dropped."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from experiments.pretrain import cinema_config
from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.dual_lora import backbone_of
from models.lit import CINEMA_CLASSES, DualLoRAClassifier
from models.loading import HEAD_PREFIX, load_cinema, save_cinema
from models.policy import canonical_key

HEAD_KEYS = (
    "pred_head_dict.cls.bias",
    "pred_head_dict.cls.weight",
    "pred_head_dict.sax.bias",
    "pred_head_dict.sax.weight",
)
DROPPED = "checkpoint head has 5 classes, this model 2: the head is dropped and re-initialised for the binary task"


@pytest.fixture(scope="module")
def acdc_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(weights, config.yaml) of a 5-class `micro` model in CineMA's fine-tuned layout, no weight at its init."""
    folder = tmp_path_factory.mktemp("finetuned") / "classification_cvd" / "acdc_sax"
    folder.mkdir(parents=True)
    document = cinema_config("micro", ConvViTConfig.preset("micro"), seed=0, spacing=(1.0, 1.0, 10.0))
    document["data"]["pathology"] = list(CINEMA_CLASSES["acdc"])
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = ConvViTConfig.from_cinema_yaml(config_path)
    assert config.n_classes == 5
    torch.manual_seed(3)
    model = ConvViT(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return save_cinema(model, folder / "acdc_sax_0.safetensors"), config_path


def fresh_state(config: ConvViTConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return ConvViT(config).state_dict()


def test_other_head_is_dropped_with_a_warning(acdc_checkpoint: tuple[Path, Path], caplog) -> None:
    weights, config_path = acdc_checkpoint
    binary = ConvViTConfig.from_cinema_yaml(config_path, n_classes=2)
    saved = load_file(weights)
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        model = load_cinema(weights, binary)
    state, fresh = model.state_dict(), fresh_state(binary, seed=7)

    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and DROPPED in r.getMessage()]
    assert len(warning) == 1
    assert str(weights) in warning[0]
    for key in HEAD_KEYS:
        assert key in warning[0]
        assert torch.equal(state[key], fresh[key])
    assert "pred_head_dict.cls.weight: checkpoint (5, 32), model (2, 32)" in warning[0]
    assert "pred_head_dict.sax.bias: checkpoint (5,), model (2,)" in warning[0]
    body = [key for key in saved if not key.startswith(HEAD_PREFIX)]
    assert set(state) == set(saved) and len(body) == len(saved) - len(HEAD_KEYS)
    assert all(torch.equal(state[key], saved[key]) for key in body)
    assert model.eval()(torch.rand(2, 2, *binary.image_size)).shape == (2, 2)


def test_fewer_classes_in_the_checkpoint_also_drop_the_head(acdc_checkpoint: tuple[Path, Path], caplog) -> None:
    weights, config_path = acdc_checkpoint
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        model = load_cinema(weights, ConvViTConfig.from_cinema_yaml(config_path, n_classes=3))
    assert "checkpoint head has 5 classes, this model 3: " in caplog.text and "for the 3-class task" in caplog.text
    assert model.state_dict()["pred_head_dict.cls.bias"].shape == (3,)


def test_same_head_loads_without_a_warning(acdc_checkpoint: tuple[Path, Path], caplog) -> None:
    weights, config_path = acdc_checkpoint
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        model = load_cinema(weights, config_path)
    saved = load_file(weights)
    assert "head is dropped" not in caplog.text
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize(
    ("key", "shape", "message"),
    [
        ("encoder.norm.weight", (33,), r"encoder\.norm\.weight: model expects \(32,\), checkpoint has \(33,\)"),
        ("encoder.blocks.3.attn.kv.weight", (64, 33), r"encoder\.blocks\.3\.attn\.kv\.weight: model expects"),
        # the head's input width, not its class count
        ("pred_head_dict.cls.weight", (5, 33), r"the head.*pred_head_dict\.cls\.weight: checkpoint \(5, 33\)"),
        # the two heads disagree on the class count
        ("pred_head_dict.sax.bias", (3,), r"the head.*pred_head_dict\.sax\.bias: checkpoint \(3,\), model \(2,\)"),
    ],
)
def test_any_other_mismatch_still_raises_naming_the_key(
    acdc_checkpoint: tuple[Path, Path], tmp_path: Path, key: str, shape: tuple[int, ...], message: str
) -> None:
    weights, config_path = acdc_checkpoint
    state = {**load_file(weights), key: torch.zeros(shape)}
    edited = tmp_path / "edited.safetensors"
    save_file(state, edited)
    binary = ConvViTConfig.from_cinema_yaml(config_path, n_classes=2)
    with pytest.raises(ValueError, match=rf"{re.escape(str(edited))}: shape mismatch for {message}"):
        load_cinema(edited, binary)


def test_binary_dual_lora_classifier_from_a_5_class_checkpoint(acdc_checkpoint: tuple[Path, Path], caplog) -> None:
    weights, config_path = acdc_checkpoint
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        module = DualLoRAClassifier(cinema_config=str(config_path), weights=str(weights), task="binary")
    assert DROPPED in caplog.text and str(weights) in caplog.text
    backbone = backbone_of(module.model)
    assert backbone.config.n_classes == 2
    saved = load_file(weights)
    state = {canonical_key(key): value for key, value in backbone.state_dict().items() if ".lora_" not in key}
    assert set(state) == set(saved)
    assert all(torch.equal(state[key], saved[key]) for key in saved if not key.startswith(HEAD_PREFIX))
    assert state["pred_head_dict.cls.weight"].shape == (2, backbone.config.embed_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weights were given: no random-backbone warning
        logits = module.eval()(torch.rand(2, 2, *backbone.config.image_size))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
