"""Tests for models.loading: CineMA fine-tuned parity, the pretrained-MAE path, strictness and atomic saving."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.loading import load_cinema, save_cinema
from models.pos_embed import sincos_pos_embed

FIRST_CONV = "enc_down_dict.sax.conv_blocks.0.patch_embed.conv.weight"
POS_EMBED = "enc_down_dict.sax.pos_embed"


@pytest.fixture(scope="module")
def tiny_dir(cinema_fixtures: Path) -> Path:
    return cinema_fixtures / "finetuned_tiny"


@pytest.fixture(scope="module")
def tiny_state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_dir / "model.safetensors")


def test_finetuned_tiny_reproduces_cinema_logits(tiny_dir: Path) -> None:
    model = load_cinema(tiny_dir / "model.safetensors", tiny_dir / "config.yaml").eval()
    io = load_file(tiny_dir / "io.safetensors")
    with torch.no_grad():
        logits = model(io["x"])
    torch.testing.assert_close(logits, io["logits"], atol=1e-5, rtol=0)
    assert torch.equal(model.state_dict()[POS_EMBED], load_file(tiny_dir / "model.safetensors")[POS_EMBED])


def test_finetuned_without_pos_embed_uses_rebuilt_table(
    tmp_path: Path, tiny_dir: Path, tiny_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "no_pos.safetensors"
    save_file({k: v for k, v in tiny_state.items() if k != POS_EMBED}, path)
    model = load_cinema(path, tiny_dir / "config.yaml")
    assert torch.equal(model.state_dict()[POS_EMBED], sincos_pos_embed(16, (4, 4, 8)))
    assert torch.equal(model.state_dict()["encoder.cls_token"], tiny_state["encoder.cls_token"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("encoder.blocks.0.attn.kv.weight"), r"lacks 1 key.*encoder\.blocks\.0\.attn\.kv\.weight"),
        (lambda s: s.pop("pred_head_dict.cls.bias"), r"lacks 1 key.*pred_head_dict\.cls\.bias"),
        (lambda s: s.update({"encoder.blocks.1.attn.q.weight": torch.zeros(16, 16)}), r"unexpected.*blocks\.1\.attn"),
        (
            lambda s: s.update({"encoder.norm.weight": torch.ones(17)}),
            r"shape mismatch for encoder\.norm\.weight: model expects \(16,\), checkpoint has \(17,\)",
        ),
    ],
)
def test_finetuned_loading_is_strict(
    tmp_path: Path, tiny_dir: Path, tiny_state: dict[str, torch.Tensor], edit, message: str
) -> None:
    state = dict(tiny_state)
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{message}"):
        load_cinema(path, tiny_dir / "config.yaml")


def test_head_of_another_width_is_a_shape_error(
    tmp_path: Path, tiny_dir: Path, tiny_state: dict[str, torch.Tensor]
) -> None:
    """Another class count drops the head (tests/test_finetuned_heads.py); another input width is an error."""
    path = tmp_path / "wide_head.safetensors"
    save_file({**tiny_state, "pred_head_dict.sax.weight": torch.zeros(2, 17)}, path)
    with pytest.raises(
        ValueError,
        match=r"head, not in its class count.*pred_head_dict\.sax\.weight: checkpoint \(2, 17\), model \(2, 16\)",
    ):
        load_cinema(path, tiny_dir / "config.yaml")


@pytest.mark.parametrize(
    "weights",
    [
        "https://huggingface.co/mathpluscode/CineMA/resolve/main/pretrained/cinema.safetensors",
        "hf://mathpluscode/CineMA/pretrained/cinema.safetensors",
        "mathpluscode/CineMA",
        "checkpoint.pt",
        "model.ckpt",
    ],
)
def test_rejects_urls_hub_ids_and_other_formats(weights: str) -> None:
    with pytest.raises(ValueError, match="local .safetensors"):
        load_cinema(weights, ConvViTConfig.preset("micro"))


def test_missing_or_corrupt_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_cinema(missing, ConvViTConfig.preset("micro"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match=r"corrupt\.safetensors: not a readable safetensors file"):
        load_cinema(corrupt, ConvViTConfig.preset("micro"))


def test_no_weights_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    message = "no pretrained weights: CineMA backbone is randomly initialised"
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match=message):
        model = load_cinema(None, ConvViTConfig.preset("micro"))
    assert isinstance(model, ConvViT)
    assert any(message in record.getMessage() for record in caplog.records)


def test_save_then_load_round_trip_is_atomic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ConvViTConfig.preset("micro", n_classes=3)
    model = ConvViT(config)
    with torch.no_grad():
        model.enc_down_dict["sax"].pos_embed.add_(0.01)  # fine-tuned files carry their own pos_embed
    path = save_cinema(model, tmp_path / "out" / "model.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]
    loaded = load_cinema(path, config)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        save_cinema(model, tmp_path / "model.pt")


def fake_mae_checkpoint(config: ConvViTConfig, seed: int) -> dict[str, torch.Tensor]:
    """A CineMA-MAE-shaped state_dict built from our own module: 1-channel encoder + decoder + other views."""
    torch.manual_seed(seed)
    encoder = ConvViT(dataclasses.replace(config, n_frames=1)).state_dict()
    mae = {k: v + 0.01 for k, v in encoder.items() if not k.startswith("pred_head_dict.")}
    dim, dec_dim, patch_voxels = config.embed_dim, 8, 16
    for view in ("lax_2c", "lax_3c", "lax_4c"):  # 2D views: same stem keys with a trailing axis dropped
        for key, value in encoder.items():
            if key.startswith(("enc_down_dict.sax.", "enc_fusion_dict.sax.")):
                shape = value.shape[:-1] if value.ndim == 5 else value.shape
                mae[key.replace(".sax.", f".{view}.")] = torch.randn(shape)
    mae["dec_linear.weight"], mae["dec_linear.bias"] = torch.randn(dec_dim, dim), torch.randn(dec_dim)
    for view in ("sax", "lax_2c", "lax_3c", "lax_4c"):
        mae[f"dec_embed_dict.{view}.pos_embed"] = torch.randn(1, 4, dec_dim)
        mae[f"dec_embed_dict.{view}.mask_token"] = torch.randn(1, 1, dec_dim)
        mae[f"pred_head_dict.{view}.weight"] = torch.randn(patch_voxels, dec_dim)
        mae[f"pred_head_dict.{view}.bias"] = torch.randn(patch_voxels)
    for key, value in encoder.items():
        if key.startswith("encoder.blocks.0.") or key.startswith("encoder.norm."):
            mae[key.replace("encoder.", "decoder.")] = torch.randn(value.shape)
    return mae


def test_mae_checkpoint_loads_encoder_and_keeps_fresh_heads(tmp_path: Path) -> None:
    config = ConvViTConfig.preset("micro")
    mae = fake_mae_checkpoint(config, seed=1)
    path = tmp_path / "cinema.safetensors"
    save_file(mae, path)
    torch.manual_seed(7)
    model = load_cinema(path, config)
    torch.manual_seed(7)
    fresh = ConvViT(config).state_dict()
    state = model.state_dict()

    assert set(state) == set(fresh)
    assert not any("decoder" in k or "lax" in k or k.startswith("dec_") for k in state)
    conv = state[FIRST_CONV]
    assert conv.shape[1] == 2 and mae[FIRST_CONV].shape[1] == 1
    assert torch.equal(conv, mae[FIRST_CONV].repeat(1, 2, 1, 1, 1))  # repeated, not halved
    for key in ("encoder.blocks.3.attn.kv.weight", "enc_fusion_dict.sax.down_convs.1.weight", "encoder.cls_token"):
        assert torch.equal(state[key], mae[key])
    for key in ("pred_head_dict.sax.weight", "pred_head_dict.cls.weight", "pred_head_dict.cls.bias"):
        assert torch.equal(state[key], fresh[key])
    assert torch.equal(state[POS_EMBED], sincos_pos_embed(config.embed_dim, config.grid_size))
    assert not torch.equal(state[POS_EMBED], mae[POS_EMBED])
    x = torch.rand(2, 2, *config.image_size)
    assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("encoder.blocks.2.mlp.fc1.bias"), r"lacks 1 key.*encoder\.blocks\.2\.mlp\.fc1\.bias"),
        (lambda s: s.update({"encoder.extra_token": torch.zeros(1, 1, 32)}), r"unexpected.*encoder\.extra_token"),
        (lambda s: s.update({FIRST_CONV: torch.zeros(8, 3, 4, 4, 1)}), r"shape mismatch for .*patch_embed\.conv"),
    ],
)
def test_mae_loading_is_strict(tmp_path: Path, edit, message: str) -> None:
    config = ConvViTConfig.preset("micro")
    mae = fake_mae_checkpoint(config, seed=2)
    edit(mae)
    path = tmp_path / "cinema.safetensors"
    save_file(mae, path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{message}"):
        load_cinema(path, config)
