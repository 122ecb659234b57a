"""Tests for models.config, models.pos_embed and models.convvit: CineMA layout, split forward, grad checkpointing."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models.config import ConvViTConfig
from models.convvit import ConvViT, PrefixFeatures
from models.pos_embed import sincos_pos_embed

BASE_PARAMETERS = 87_724_740  # learnable; + the fixed 1,769,472-value pos_embed = CineMA's 89,494,212
BASE_POS_EMBED = 12 * 12 * 16 * 768


def micro(**overrides: object) -> ConvViTConfig:
    return ConvViTConfig.preset("micro", **overrides)


def random_input(config: ConvViTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.input_chans, *config.image_size, generator=generator)


def test_base_state_dict_equals_cinema_manifest(cinema_fixtures: Path) -> None:
    manifest = json.loads((cinema_fixtures / "keys/convvit_base_sax_2frames_2classes.keys.json").read_text())
    with torch.device("meta"):
        model = ConvViT(ConvViTConfig.preset("base"))
    state = model.state_dict()
    assert list(state) == list(manifest)
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in manifest.items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert sum(p.numel() for p in model.parameters()) == BASE_PARAMETERS
    assert [name for name, _ in model.named_buffers()] == ["enc_down_dict.sax.pos_embed"]
    assert BASE_PARAMETERS + BASE_POS_EMBED == 89_494_212


def test_block_projections_are_plain_linears() -> None:
    model = ConvViT(micro())
    for block in model.encoder.blocks:
        for layer in (block.attn.q, block.attn.kv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert type(layer) is nn.Linear
        assert block.attn.kv.out_features == 2 * block.attn.q.out_features


@pytest.mark.parametrize(
    ("name", "dims", "image_size"),
    [
        ("tiny", (16, 1, 2), (192, 192, 16)),
        ("base", (768, 12, 12), (192, 192, 16)),
        ("large", (1024, 24, 16), (192, 192, 16)),
        ("huge", (1280, 32, 16), (192, 192, 16)),
        ("small", (192, 12, 3), (96, 96, 16)),
        ("micro", (32, 4, 2), (64, 64, 8)),
    ],
)
def test_presets(name: str, dims: tuple[int, int, int], image_size: tuple[int, int, int]) -> None:
    config = ConvViTConfig.preset(name)
    assert (config.embed_dim, config.depth, config.n_heads) == dims
    assert config.image_size == image_size
    assert config.conv_chans == ((8, 16) if name == "micro" else (64, 128))


def test_preset_overrides_and_errors() -> None:
    config = ConvViTConfig.preset("base", n_classes=5, image_size=[160, 192, 16])
    assert config.n_classes == 5 and config.image_size == (160, 192, 16) and config.grid_size == (10, 12, 16)
    with pytest.raises(ValueError, match="unknown ConvViT preset 'gigantic'"):
        ConvViTConfig.preset("gigantic")
    with pytest.raises(ValueError, match="unknown ConvViTConfig field"):
        ConvViTConfig.preset("micro", embed_dims=8)
    with pytest.raises(ValueError, match="image_size .* not divisible"):
        ConvViTConfig.preset("micro", image_size=(72, 64, 8))
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ConvViTConfig.preset("micro", n_heads=3)


def test_from_cinema_yaml_reads_fixture_config(cinema_fixtures: Path) -> None:
    path = cinema_fixtures / "finetuned_tiny/config.yaml"
    config = ConvViTConfig.from_cinema_yaml(path)
    assert (config.embed_dim, config.depth, config.n_heads) == (16, 1, 2)
    assert config.image_size == (64, 64, 8) and config.conv_chans == (8, 16)
    assert (config.n_frames, config.in_chans, config.n_classes) == (2, 1, 2)
    assert config.patch_size == (4, 4, 1) and config.scale_factor == (2, 2, 1) and config.conv_n_blocks == 2
    assert ConvViTConfig.from_cinema_yaml(path, n_classes=5).n_classes == 5


def test_from_cinema_yaml_accepts_cpu_preset_sizes(tmp_path: Path, cinema_fixtures: Path) -> None:
    source = (cinema_fixtures / "finetuned_tiny/config.yaml").read_text()
    micro = tmp_path / "micro.yaml"
    micro.write_text(source.replace("size: tiny", "size: micro"))
    config = ConvViTConfig.from_cinema_yaml(micro)
    reference = ConvViTConfig.preset("micro")
    assert (config.embed_dim, config.depth, config.n_heads) == (
        reference.embed_dim,
        reference.depth,
        reference.n_heads,
    )


def test_from_cinema_yaml_names_file_and_field(tmp_path: Path, cinema_fixtures: Path) -> None:
    source = (cinema_fixtures / "finetuned_tiny/config.yaml").read_text()
    no_size = tmp_path / "no_size.yaml"
    no_size.write_text(source.replace("    size: tiny\n", ""))
    with pytest.raises(ValueError, match=rf"{no_size}.*model\.convvit\.size"):
        ConvViTConfig.from_cinema_yaml(no_size)
    lax = tmp_path / "lax.yaml"
    lax.write_text(source.replace("views: sax", "views: lax_4c"))
    with pytest.raises(ValueError, match=rf"{lax}.*model\.views"):
        ConvViTConfig.from_cinema_yaml(lax)
    bad_patch = tmp_path / "bad_patch.yaml"
    bad_patch.write_text(source.replace("    - 64\n    - 64\n    - 8\n", "    - 64\n    - 8\n"))
    with pytest.raises(ValueError, match=rf"{bad_patch}.*data\.sax\.patch_size"):
        ConvViTConfig.from_cinema_yaml(bad_patch)


def test_pos_embed_follows_cinema_xy_meshgrid_layout() -> None:
    grid, embed_dim = (3, 2, 4), 16  # each axis gets 4 channels (2 sin, 2 cos); 4 zero channels
    table = sincos_pos_embed(embed_dim, grid)[0]
    assert table.shape == (24, 16)

    def axis_code(position: float) -> list[float]:
        freqs = [1.0, 10000.0 ** (-1 / 2)]
        return [math.sin(position * f) for f in freqs] + [math.cos(position * f) for f in freqs]

    for row in range(24):
        # numpy meshgrid(indexing="xy") orders rows (y, x, z): the second axis varies slowest
        y, rest = divmod(row, grid[0] * grid[2])
        x, z = divmod(rest, grid[2])
        expected = axis_code(x) + axis_code(y) + axis_code(z) + [0.0] * 4
        torch.testing.assert_close(table[row], torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("image_size", [(64, 64, 8), (64, 48, 8)])
def test_forward_equals_suffix_of_prefix_for_every_split(image_size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    config = micro(image_size=image_size, n_classes=3)
    model = ConvViT(config).eval()
    x = random_input(config)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3)
        for k in range(config.depth + 1):
            prefix = model.forward_prefix(x, k)
            assert prefix.tokens.shape == (2, 1 + config.n_patches, config.embed_dim)
            assert prefix.skip_tokens.shape == (2, config.n_patches, config.embed_dim)
            assert torch.equal(model.forward_suffix(prefix, k), logits)


def test_prefix_features_detach_and_to() -> None:
    config = micro()
    model = ConvViT(config)
    prefix = model.forward_prefix(random_input(config), 2)
    assert prefix.tokens.requires_grad
    detached = prefix.detach().to(torch.float64)
    assert isinstance(detached, PrefixFeatures)
    assert not detached.tokens.requires_grad and detached.skip_tokens.dtype == torch.float64


def test_cached_prefix_trains_suffix_like_full_forward() -> None:
    torch.manual_seed(0)
    config = micro()
    model = ConvViT(config).eval()
    x = random_input(config)
    model(x).sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("encoder.blocks.3")}
    model.zero_grad()
    with torch.no_grad():
        prefix = model.forward_prefix(x, 3)
    model.forward_suffix(prefix, 3).sum().backward()
    for name, grad in full_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)


def test_split_indices_and_input_shape_are_checked() -> None:
    config = micro()
    model = ConvViT(config)
    with pytest.raises(ValueError, match=r"n_blocks must be in \[0, 4\]"):
        model.forward_prefix(random_input(config), 5)
    prefix = model.forward_prefix(random_input(config), 0)
    with pytest.raises(ValueError, match="start_block"):
        model.forward_suffix(prefix, -1)
    with pytest.raises(ValueError, match=r"\(B, 2, 64, 64, 8\)"):
        model(torch.rand(1, 2, 64, 64, 16))


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_grad_ckpt_gives_same_outputs_and_grads(drop_path: float) -> None:
    torch.manual_seed(0)
    config = micro(drop_path=drop_path)
    model = ConvViT(config).train()
    x = random_input(config)
    results = []
    for enabled in (False, True):
        model.set_grad_ckpt(enabled)
        assert model.grad_ckpt is enabled
        model.zero_grad()
        torch.manual_seed(1)
        logits = model(x)
        logits.square().sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_logits, plain_grads), (ckpt_logits, ckpt_grads) = results
    torch.testing.assert_close(ckpt_logits, plain_logits, atol=0, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_grad_ckpt_stays_off_with_attention_dropout() -> None:
    model = ConvViT(micro(attn_drop=0.1))
    with pytest.warns(UserWarning, match="not supported with attention dropout"):
        model.set_grad_ckpt(True)
    assert model.grad_ckpt is False
    assert ConvViT(micro(grad_ckpt=True)).grad_ckpt is True


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    config = micro(drop_path=0.3, attn_drop=0.2, proj_drop=0.2)
    model = ConvViT(config)
    x = random_input(config, batch=4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_same_seed_same_model() -> None:
    torch.manual_seed(3)
    first = ConvViT(micro()).state_dict()
    torch.manual_seed(3)
    second = ConvViT(micro()).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_config_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        micro().depth = 3  # type: ignore[misc]
