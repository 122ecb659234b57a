"""Strict loading of local CineMA `.safetensors` checkpoints (fine-tuned ConvViT or pretrained MAE) and saving."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.atomic_io import atomic_path
from models.config import ConvViTConfig
from models.convvit import VIEW, ConvViT

logger = logging.getLogger(__name__)

NO_WEIGHTS_MESSAGE = (
    "no pretrained weights: CineMA backbone is randomly initialised (weights=None); "
    "results will not reflect the CineMA foundation model"
)
POS_EMBED_KEY = f"enc_down_dict.{VIEW}.pos_embed"
FIRST_CONV_KEY = f"enc_down_dict.{VIEW}.conv_blocks.0.patch_embed.conv.weight"
HEAD_PREFIX = "pred_head_dict."
# Keys of the pretrained MAE that a ConvViT never uses (CineMA `load_pretrain_weights`), matched as substrings.
MAE_DROP_SUBSTRINGS = ("mask", "decoder", "_head", "dec_linear", "pos_embed")
MAE_OTHER_VIEWS = ("lax_2c", "lax_3c", "lax_4c")
MAE_MARKERS = ("decoder.", "dec_linear.", "dec_embed_dict.")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def load_cinema(weights: str | Path | None, config: str | Path | ConvViTConfig) -> ConvViT:
    """Build a ConvViT from `config` (a CineMA downstream config.yaml or a ConvViTConfig) and load `weights`.

    `weights` is a local `.safetensors` file in either published CineMA format, detected from its keys:
    - fine-tuned ConvViT: every key of `ConvViT.state_dict()`, heads included (the fixed `pos_embed` may be
      absent, then the rebuilt sin-cos one is kept);
    - pretrained MAE (`cinema.safetensors`): decoder, mask token, heads, `pos_embed` and other-view keys are
      dropped, the 1-channel first stem conv is repeated over the input frames, the heads stay freshly initialised.
    A fine-tuned checkpoint whose head has another number of classes (e.g. CineMA's 5-class ACDC model for a binary
    model) loses its head, with a warning naming the file, the head keys and both shapes; the fresh head stays.
    Any other missing or unexpected key, or a shape mismatch, raises a ValueError naming the key and the file.
    `weights=None` returns a randomly initialised model and warns loudly. Nothing is ever downloaded.
    The model is returned in training mode; call `.eval()` for CineMA-equal inference.
    """
    model_config = config if isinstance(config, ConvViTConfig) else _config_from_path(config)
    model = ConvViT(model_config)
    if weights is None:
        warnings.warn(NO_WEIGHTS_MESSAGE, UserWarning, stacklevel=2)
        logger.warning(NO_WEIGHTS_MESSAGE)
        return model
    path = _local_safetensors_path(weights)
    checkpoint = _read_safetensors(path)
    expected = model.state_dict()
    if any(key.startswith(MAE_MARKERS) for key in checkpoint):
        state = _state_from_mae(checkpoint, expected, path)
        logger.info(
            "loaded pretrained CineMA MAE encoder from %s (%d tensors; heads freshly initialised)", path, len(state)
        )
    else:
        state = _state_from_finetuned(checkpoint, expected, path)
        logger.info("loaded fine-tuned CineMA ConvViT from %s (%d tensors)", path, len(state))
    model.load_state_dict({**expected, **state}, strict=True)
    return model


def save_cinema(model: ConvViT, path: str | Path) -> Path:
    """Write the model's state_dict in CineMA's fine-tuned format, atomically (temporary file, then rename)."""
    if not isinstance(model, ConvViT):
        raise TypeError(f"save_cinema needs a models.convvit.ConvViT, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: CineMA checkpoints are written as .safetensors only")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    return path


def _config_from_path(config: str | Path) -> ConvViTConfig:
    if not isinstance(config, str | Path):
        raise TypeError(f"config must be a CineMA config.yaml path or a ConvViTConfig, got {type(config).__name__}")
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CineMA config.yaml not found")
    return ConvViTConfig.from_cinema_yaml(path)


def _local_safetensors_path(weights: str | Path) -> Path:
    text = str(weights)
    if _URL.match(text):
        raise ValueError(f"{text}: weights must be a local .safetensors file; load_cinema never downloads (got a URL)")
    path = Path(weights)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{text}: weights must be a local .safetensors file (no .pt/.ckpt/pickle, no Hugging Face hub id)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{text}: no such local checkpoint file; load_cinema never downloads")
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file: {err}") from err


def _state_from_finetuned(
    checkpoint: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Fine-tuned format: every model key must be present (pos_embed may be absent), nothing else; a head with
    another number of classes is dropped (the model keeps its fresh head), any other shape mismatch is an error."""
    _check_keys(set(checkpoint), set(expected) - {POS_EMBED_KEY}, set(expected), path)
    body = {key: value for key, value in checkpoint.items() if not key.startswith(HEAD_PREFIX)}
    _check_shapes(body, expected, path)
    differing = _head_mismatches(checkpoint, expected)
    classes = _other_head_classes(checkpoint, expected) if differing else None
    if classes is not None:
        found, wanted = classes
        task = "binary" if wanted == 2 else f"{wanted}-class"
        logger.warning(
            "%s: checkpoint head has %d classes, this model %d: the head is dropped and re-initialised for the %s "
            "task (%s)",
            path,
            found,
            wanted,
            task,
            differing,
        )
        checkpoint = body
    elif differing:
        raise ValueError(f"{path}: shape mismatch for the head, not in its class count alone: {differing}")
    if POS_EMBED_KEY not in checkpoint:
        logger.info("%s has no %s; using the rebuilt sin-cos embedding", path, POS_EMBED_KEY)
    return checkpoint


def _head_mismatches(checkpoint: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """`key: checkpoint (shape), model (shape)` for each head key whose shape differs ("" when none does)."""
    return "; ".join(
        f"{key}: checkpoint {tuple(checkpoint[key].shape)}, model {tuple(expected[key].shape)}"
        for key in sorted(expected)
        if key.startswith(HEAD_PREFIX) and checkpoint[key].shape != expected[key].shape
    )


def _other_head_classes(
    checkpoint: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[int, int] | None:
    """(checkpoint, model) class counts when every head key differs in its class axis (dim 0) alone, else None."""
    heads = [key for key in expected if key.startswith(HEAD_PREFIX)]
    if any(
        checkpoint[key].ndim != expected[key].ndim or checkpoint[key].shape[1:] != expected[key].shape[1:]
        for key in heads
    ):
        return None
    found = {checkpoint[key].shape[0] for key in heads}
    wanted = {expected[key].shape[0] for key in heads}
    if len(found) != 1 or len(wanted) != 1 or found == wanted:
        return None
    return found.pop(), wanted.pop()


def _state_from_mae(
    checkpoint: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Pretrained MAE format: drop what a ConvViT never uses, repeat the first conv, leave heads and pos_embed."""
    kept = {key: value for key, value in checkpoint.items() if not _is_dropped_mae_key(key)}
    logger.info("%s: dropped %d MAE-only / other-view keys", path, len(checkpoint) - len(kept))
    needed = {key for key in expected if not key.startswith(HEAD_PREFIX) and key != POS_EMBED_KEY}
    _check_keys(set(kept), needed, needed, path)
    if FIRST_CONV_KEY in kept:
        kept[FIRST_CONV_KEY] = _repeat_input_channels(kept[FIRST_CONV_KEY], expected[FIRST_CONV_KEY], path)
    _check_shapes(kept, expected, path)
    return kept


def _is_dropped_mae_key(key: str) -> bool:
    return any(part in key for part in MAE_DROP_SUBSTRINGS) or any(view in key.split(".") for view in MAE_OTHER_VIEWS)


def _repeat_input_channels(weight: torch.Tensor, target: torch.Tensor, path: Path) -> torch.Tensor:
    """Repeat (not divide) the pretrained input channels of the first stem conv up to the model's input channels."""
    found, wanted = weight.shape[1], target.shape[1]
    if weight.ndim != target.ndim or found == wanted or wanted % found:
        return weight  # identical, or a mismatch that _check_shapes reports
    logger.info("%s: repeating %s input channels %d -> %d", path, FIRST_CONV_KEY, found, wanted)
    return weight.repeat(1, wanted // found, *([1] * (weight.ndim - 2)))


def _check_keys(found: set[str], required: set[str], allowed: set[str], path: Path) -> None:
    missing = sorted(required - found)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} key(s) the ConvViT needs: {_preview(missing)}")
    unexpected = sorted(found - allowed)
    if unexpected:
        raise ValueError(f"{path}: checkpoint has {len(unexpected)} unexpected key(s): {_preview(unexpected)}")


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: shape mismatch for {key}: model expects {tuple(expected[key].shape)}, "
                f"checkpoint has {tuple(value.shape)}"
            )


def _preview(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys) - limit} more)"
