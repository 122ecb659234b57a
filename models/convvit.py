"""CineMA-compatible SAX ConvViT with a prefix/suffix split for frozen-feature caching."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.config import ConvViTConfig
from models.layers import Block, ConvNormAct, MaskedConvBlock
from models.pos_embed import sincos_pos_embed

logger = logging.getLogger(__name__)
VIEW = "sax"


@dataclass
class PrefixFeatures:
    """What `ConvViT.forward_suffix` needs after the first blocks.

    tokens: (B, 1 + n_patches, embed_dim), CLS first, after the first n_blocks encoder blocks.
    skip_tokens: (B, n_patches, embed_dim), the conv-stem skips projected onto the token grid by the
        fusion's strided convs and summed (the suffix adds them to the patch tokens, then LayerNorm).
    """

    tokens: torch.Tensor
    skip_tokens: torch.Tensor

    def detach(self) -> PrefixFeatures:
        """Both tensors cut from the autograd graph (what a frozen-prefix cache stores)."""
        return PrefixFeatures(self.tokens.detach(), self.skip_tokens.detach())

    def to(self, *args: Any, **kwargs: Any) -> PrefixFeatures:
        """Move / cast both tensors, with the arguments of `torch.Tensor.to`."""
        return PrefixFeatures(self.tokens.to(*args, **kwargs), self.skip_tokens.to(*args, **kwargs))


class PatchEmbed(nn.Module):
    """Cut (B, C, X, Y, Z) into non-overlapping patches flattened as (px, py, pz, c) and project them linearly."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_chans * patch_size[0] * patch_size[1] * patch_size[2], embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, chans, size_x, size_y, size_z = x.shape
        px, py, pz = self.patch_size
        x = x.reshape(batch, chans, size_x // px, px, size_y // py, py, size_z // pz, pz)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, -1, px * py * pz * chans)
        return self.proj(x)


class ConvStage(nn.Module):
    """One stem stage: a strided patchifying conv, then `conv_n_blocks` ConvMAE conv blocks."""

    def __init__(self, in_chans: int, out_chans: int, stride: tuple[int, int, int], n_blocks: int, eps: float) -> None:
        super().__init__()
        self.patch_embed = ConvNormAct(in_chans, out_chans, stride, eps)
        self.conv = nn.ModuleList(MaskedConvBlock(out_chans, eps) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.conv:
            x = block(x)
        return x


class DownsampleEncoder(nn.Module):
    """Conv stem + patch embedding + extra linear + fixed sin-cos position embedding (CineMA `enc_down_dict.sax`)."""

    pos_embed: torch.Tensor

    def __init__(self, config: ConvViTConfig) -> None:
        super().__init__()
        self.register_buffer("pos_embed", sincos_pos_embed(config.embed_dim, config.grid_size))
        strides = config.stage_patch_sizes
        in_chans = (config.input_chans, *config.conv_chans)
        self.conv_blocks = nn.ModuleList(
            ConvStage(in_chans[i], chans, strides[i], config.conv_n_blocks, config.conv_norm_eps)
            for i, chans in enumerate(config.conv_chans)
        )
        self.patch_embed = PatchEmbed(strides[-1], in_chans[-1], config.embed_dim)
        self.linear = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return the stage outputs (skips) and the (B, n_patches, embed_dim) tokens with position embedding."""
        skips = []
        for stage in self.conv_blocks:
            x = stage(x)
            skips.append(x)
        return skips, self.linear(self.patch_embed(x)) + self.pos_embed


class MultiScaleFusion(nn.Module):
    """Project each stem skip onto the token grid with a strided conv, add to the patch tokens, LayerNorm."""

    def __init__(self, config: ConvViTConfig) -> None:
        super().__init__()
        strides = config.stage_patch_sizes
        self.down_convs = nn.ModuleList()
        for stage, chans in enumerate(config.conv_chans):
            # stride from this stage's output grid to the token grid: product of the later strides
            kernel = tuple(math.prod(s[axis] for s in strides[stage + 1 :]) for axis in range(3))
            self.down_convs.append(nn.Conv3d(chans, config.embed_dim, kernel_size=kernel, stride=kernel))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)

    def project_skips(self, skips: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Sum of the projected skips as (B, n_patches, embed_dim); zeros shaped `like` when there is no stem."""
        total = torch.zeros_like(like)
        for skip, conv in zip(skips, self.down_convs, strict=True):
            total = total + conv(skip).flatten(2).transpose(1, 2)
        return total

    def forward(self, patch_tokens: torch.Tensor, skip_tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(patch_tokens + skip_tokens)


class ViTEncoder(nn.Module):
    """CLS token, transformer blocks and final LayerNorm (CineMA `encoder`)."""

    def __init__(self, config: ConvViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.n_heads,
                config.mlp_ratio,
                config.qkv_bias,
                config.norm_eps,
                config.drop_path,
                config.attn_drop,
                config.proj_drop,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)


class ConvViT(nn.Module):
    """SAX ConvViT whose state_dict matches CineMA's; forward(x) = CineMA `forward({"sax": x}, reduce="all")`."""

    def __init__(self, config: ConvViTConfig) -> None:
        super().__init__()
        self.config = config
        self.enc_down_dict = nn.ModuleDict({VIEW: DownsampleEncoder(config)})
        self.enc_fusion_dict = nn.ModuleDict({VIEW: MultiScaleFusion(config)})
        self.encoder = ViTEncoder(config)
        self.apply(_init_cinema_weights)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        # CineMA creates the heads after its init pass, so they keep PyTorch's default nn.Linear init.
        self.pred_head_dict = nn.ModuleDict(
            {name: nn.Linear(config.embed_dim, config.n_classes) for name in (VIEW, "cls")}
        )
        self.set_grad_ckpt(config.grad_ckpt)

    @property
    def grad_ckpt(self) -> bool:
        """Whether encoder blocks are gradient-checkpointed."""
        return all(block.grad_ckpt for block in self.encoder.blocks)

    def set_grad_ckpt(self, enabled: bool) -> None:
        """Gradient-checkpoint every encoder block; refused (stays off, with a warning) under attention dropout."""
        if enabled and (self.config.attn_drop > 0.0 or self.config.proj_drop > 0.0):
            message = "gradient checkpointing is not supported with attention dropout > 0; leaving it off"
            warnings.warn(message, stacklevel=2)
            logger.warning(message)
            enabled = False
        for block in self.encoder.blocks:
            block.grad_ckpt = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_frames * in_chans, X, Y, Z) float -> logits (B, n_classes)."""
        return self.forward_suffix(self.forward_prefix(x, 0), 0)

    def forward_prefix(self, x: torch.Tensor, n_blocks: int) -> PrefixFeatures:
        """Run the conv stem, patch embedding, skip projections and the first `n_blocks` encoder blocks."""
        self._check_block_index("n_blocks", n_blocks)
        self._check_input(x)
        skips, patch_tokens = self.enc_down_dict[VIEW](x)
        skip_tokens = self.enc_fusion_dict[VIEW].project_skips(skips, like=patch_tokens)
        cls_tokens = self.encoder.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat((cls_tokens, patch_tokens), dim=1)
        for block in self.encoder.blocks[:n_blocks]:
            tokens = block(tokens)
        return PrefixFeatures(tokens=tokens, skip_tokens=skip_tokens)

    def forward_suffix(self, prefix: PrefixFeatures, start_block: int) -> torch.Tensor:
        """Run encoder blocks from `start_block` on, the final norm, the multi-scale fusion and both heads."""
        pooled_patches, cls_token = self.suffix_features(prefix, start_block)
        logits_patch = self.pred_head_dict[VIEW](pooled_patches)
        logits_cls = self.pred_head_dict["cls"](cls_token)
        return torch.stack((logits_patch, logits_cls), dim=1).mean(dim=1)

    def suffix_features(self, prefix: PrefixFeatures, start_block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the two heads read: the mean fused patch token and the CLS token, each (B, embed_dim)."""
        self._check_block_index("start_block", start_block)
        tokens = prefix.tokens
        for block in self.encoder.blocks[start_block:]:
            tokens = block(tokens)
        tokens = self.encoder.norm(tokens)
        cls_token, patch_tokens = tokens[:, 0], tokens[:, 1:]
        patch_tokens = self.enc_fusion_dict[VIEW](patch_tokens, prefix.skip_tokens)
        return patch_tokens.mean(dim=1), cls_token

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen-feature representation (B, 2 * embed_dim): mean fused patch token, then CLS token."""
        return torch.cat(self.suffix_features(self.forward_prefix(x, 0), 0), dim=1)

    def _check_block_index(self, name: str, index: int) -> None:
        if not 0 <= index <= self.config.depth:
            raise ValueError(f"{name} must be in [0, {self.config.depth}], got {index}")

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.config.input_chans, *self.config.image_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected or not x.is_floating_point():
            raise ValueError(
                f"ConvViT expects a float tensor (B, {', '.join(map(str, expected))}) "
                f"(channels = n_frames x in_chans, then X, Y, Z); got {x.dtype} {tuple(x.shape)}"
            )


def _init_cinema_weights(module: nn.Module) -> None:
    """CineMA's init: Xavier-uniform Linear weights with zero bias, LayerNorm 1 / 0; convs keep PyTorch's init."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
