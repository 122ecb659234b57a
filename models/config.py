"""ConvViTConfig: every dimension of the CineMA SAX ConvViT, with presets and a CineMA config.yaml reader."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# CineMA's ViT sizes (cinema/vit.py get_vit_config): embed_dim, depth, n_heads.
CINEMA_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (16, 1, 2),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
CPU_PRESETS: dict[str, dict[str, Any]] = {
    "small": {"embed_dim": 192, "depth": 12, "n_heads": 3, "image_size": (96, 96, 16)},
    "mini": {"embed_dim": 64, "depth": 6, "n_heads": 4, "conv_chans": (16, 32), "image_size": (64, 64, 8)},
    "micro": {"embed_dim": 32, "depth": 4, "n_heads": 2, "conv_chans": (8, 16), "image_size": (64, 64, 8)},
}
PRESET_NAMES = (*CINEMA_SIZES, *CPU_PRESETS)


@dataclass(frozen=True)
class ConvViTConfig:
    """Dimensions of a single-view (SAX) CineMA ConvViT; defaults are CineMA-base as fine-tuned for classification."""

    image_size: tuple[int, int, int] = (192, 192, 16)
    n_frames: int = 2
    in_chans: int = 1
    n_classes: int = 2
    patch_size: tuple[int, int, int] = (4, 4, 1)
    scale_factor: tuple[int, int, int] = (2, 2, 1)
    conv_chans: tuple[int, ...] = (64, 128)
    conv_n_blocks: int = 2
    embed_dim: int = 768
    depth: int = 12
    n_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    conv_norm_eps: float = 1e-6
    drop_path: float = 0.0
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    grad_ckpt: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "scale_factor", "conv_chans"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("image_size", "patch_size", "scale_factor"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"ConvViTConfig.{name} must have 3 entries (x, y, z), got {getattr(self, name)}")
        for name in ("image_size", "patch_size", "scale_factor", "conv_chans"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"ConvViTConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_frames", "in_chans", "n_classes", "embed_dim", "depth", "n_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ConvViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_n_blocks < 0:
            raise ValueError(f"ConvViTConfig.conv_n_blocks must be >= 0, got {self.conv_n_blocks}")
        if self.embed_dim % self.n_heads:
            raise ValueError(f"ConvViTConfig.embed_dim {self.embed_dim} is not divisible by n_heads {self.n_heads}")
        if self.embed_dim < 6:
            raise ValueError(
                f"ConvViTConfig.embed_dim must be >= 6 for the 3D sin-cos embedding, got {self.embed_dim}"
            )
        for name in ("drop_path", "attn_drop", "proj_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ConvViTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        bad = [i for i, (s, p) in enumerate(zip(self.image_size, self.effective_patch_size, strict=True)) if s % p]
        if bad:
            raise ValueError(
                f"ConvViTConfig.image_size {self.image_size} is not divisible by the effective patch size "
                f"{self.effective_patch_size} (patch_size x scale_factor^n_stages) on axis {bad}"
            )

    @property
    def stage_patch_sizes(self) -> tuple[tuple[int, int, int], ...]:
        """Stride of each conv stage, then of the final patch embedding: [patch_size] + [scale_factor] * n_stages."""
        return (self.patch_size, *([self.scale_factor] * len(self.conv_chans)))

    @property
    def effective_patch_size(self) -> tuple[int, int, int]:
        """Input voxels per token along each axis."""
        return tuple(math.prod(axis) for axis in zip(*self.stage_patch_sizes, strict=True))  # type: ignore[return-value]

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid (x, y, z)."""
        return tuple(s // p for s, p in zip(self.image_size, self.effective_patch_size, strict=True))  # type: ignore[return-value]

    @property
    def n_patches(self) -> int:
        """Number of patch tokens (the CLS token excluded)."""
        return math.prod(self.grid_size)

    @property
    def input_chans(self) -> int:
        """Channels of the model input: n_frames x in_chans."""
        return self.n_frames * self.in_chans

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ConvViTConfig:
        """CineMA `tiny` / `base` / `large` / `huge` (192x192x16) or CPU `small` / `mini` / `micro`, with overrides."""
        if name in CINEMA_SIZES:
            embed_dim, depth, n_heads = CINEMA_SIZES[name]
            fields: dict[str, Any] = {"embed_dim": embed_dim, "depth": depth, "n_heads": n_heads}
        elif name in CPU_PRESETS:
            fields = dict(CPU_PRESETS[name])
        else:
            raise ValueError(f"unknown ConvViT preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ConvViTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{**fields, **overrides})

    @classmethod
    def from_cinema_yaml(cls, path: str | Path, n_classes: int | None = None) -> ConvViTConfig:
        """Read a CineMA downstream config.yaml; n_classes defaults to the length of the `class_column` list."""
        path = Path(path)
        try:
            root = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read CineMA config: {err}") from err
        reader = _YamlReader(path, root)
        model_name = reader.get("model.name", "convvit")
        if model_name != "convvit":
            raise ValueError(f"{path}: field model.name is {model_name!r}; only 'convvit' is supported")
        views = reader.get("model.views")
        if views not in ("sax", ["sax"]):
            raise ValueError(f"{path}: field model.views is {views!r}; only the SAX view ('sax') is supported")
        size = reader.get("model.convvit.size")
        if size in CINEMA_SIZES:
            embed_dim, depth, n_heads = CINEMA_SIZES[size]
        elif size in CPU_PRESETS:  # our own CPU sizes, written by save_cinema / experiments.pretrain
            embed_dim, depth, n_heads = (CPU_PRESETS[size][k] for k in ("embed_dim", "depth", "n_heads"))
        else:
            raise ValueError(f"{path}: field model.convvit.size is {size!r}; expected one of {list(PRESET_NAMES)}")
        try:
            return cls(
                image_size=reader.int_list("data.sax.patch_size", 3),
                n_frames=reader.int_value("model.n_frames"),
                in_chans=reader.int_value("data.sax.in_chans"),
                n_classes=n_classes if n_classes is not None else reader.n_classes(),
                patch_size=reader.int_list("model.convvit.enc_patch_size", 3),
                scale_factor=reader.int_list("model.convvit.enc_scale_factor", 3),
                conv_chans=reader.int_list("model.convvit.enc_conv_chans"),
                conv_n_blocks=reader.int_value("model.convvit.enc_conv_n_blocks"),
                embed_dim=embed_dim,
                depth=depth,
                n_heads=n_heads,
                drop_path=float(reader.get("model.convvit.drop_path", 0.0)),
                grad_ckpt=bool(reader.get("grad_ckpt", False)),
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


class _YamlReader:
    """Dotted-path access to a parsed YAML mapping, with errors that name the file and the field."""

    _MISSING = object()

    def __init__(self, path: Path, root: Any) -> None:
        if not isinstance(root, Mapping):
            raise ValueError(f"{path}: a CineMA config must be a YAML mapping, got {type(root).__name__}")
        self.path = path
        self.root = root

    def get(self, field: str, default: Any = _MISSING) -> Any:
        node: Any = self.root
        for part in field.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if default is self._MISSING:
                    raise ValueError(f"{self.path}: missing field {field}")
                return default
            node = node[part]
        return node

    def int_value(self, field: str) -> int:
        value = self.get(field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.path}: field {field} must be an integer, got {value!r}")
        return value

    def int_list(self, field: str, length: int | None = None) -> list[int]:
        value = self.get(field)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{self.path}: field {field} must be a list of integers, got {value!r}")
        if length is not None:
            if len(value) < length:
                raise ValueError(f"{self.path}: field {field} needs {length} entries, got {value!r}")
            value = value[:length]
        return value

    def n_classes(self) -> int:
        column = self.get("data.class_column", None)
        if column is not None:
            classes = self.get(f"data.{column}")
            if not isinstance(classes, list) or not classes:
                raise ValueError(f"{self.path}: field data.{column} (the class_column) must be a non-empty list")
            return len(classes)
        if self.get("data.regression_column", None) is not None:
            return 1
        return self.int_value("model.out_chans")


CINEMA_SPACING_MM = (1.0, 1.0, 10.0)
"""CineMA's input voxel size (reference-cinema.md §3): the spacing of a backbone without a config.yaml."""


def cinema_yaml_spacing(path: str | Path) -> tuple[float, float, float]:
    """The input voxel size (mm) a CineMA config.yaml declares (`data.sax.spacing`), CineMA's when absent."""
    path = Path(path)
    try:
        root = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read CineMA config: {err}") from err
    value = _YamlReader(path, root).get("data.sax.spacing", list(CINEMA_SPACING_MM))
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, int | float) for v in value):
        raise ValueError(f"{path}: field data.sax.spacing must be three numbers (mm), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))
