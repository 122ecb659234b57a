"""Add peft LoRA adapters `global` / `local` to a ConvViT, set what trains per policy, save and load them."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from models.convvit import ConvViT
from models.dual_lora.config import DualLoRAConfig
from models.policy import SharingPolicy, canonical_key, get_policy

HEADS_FILE = "heads.safetensors"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"


def build_policy(
    name: str, adapter_config: DualLoRAConfig, depth: int, share_head: bool | None = None
) -> SharingPolicy:
    """The named policy; `fedavg_full` fine-tunes the adapter config's blocks fully instead of adding LoRA."""
    full_blocks = adapter_config.resolve_blocks(depth) if name == "fedavg_full" else None
    return get_policy(name, share_head=share_head, full_blocks=full_blocks)


def backbone_of(model: nn.Module) -> ConvViT:
    """The ConvViT inside a PeftModel (or the model itself)."""
    backbone = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(backbone, ConvViT):
        raise TypeError(f"expected a ConvViT or a PeftModel around one, got {type(backbone).__name__}")
    return backbone


def add_adapters(backbone: ConvViT, adapter_config: DualLoRAConfig, policy: SharingPolicy) -> nn.Module:
    """Wrap `backbone` (in place) with the policy's peft LoRA adapters, all active, and set requires_grad.

    Returns a PeftModel whose adapters are named `global` and / or `local`, or the backbone itself for policies
    without adapters (`fedavg_full`). Adapter A matrices are drawn from `adapter_config.init_seed` (identical at every
    site), B starts at zero, so the wrapped model first computes exactly the backbone's function.
    """
    depth = backbone.config.depth
    if not policy.adapters:
        apply_trainable(backbone, policy)
        return backbone
    first, *others = policy.adapters
    model = get_peft_model(backbone, adapter_config.lora_config(first, depth), adapter_name=first)
    for name in others:
        model.add_adapter(name, adapter_config.lora_config(name, depth))
    for name in policy.adapters:
        init_adapter(model, name, adapter_config.init_seed)
    activate_adapters(model, policy, policy.adapters)
    return model


def init_adapter(model: nn.Module, adapter: str, seed: int) -> None:
    """Kaiming-uniform A (as peft) from a generator seeded per (seed, adapter, module), B = 0: order-independent."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{adapter}:{canonical_key(name)}".encode()))
            weight_a = module.lora_A[adapter].weight
            with torch.no_grad():
                cpu_a = torch.empty(weight_a.shape, dtype=weight_a.dtype)
                nn.init.kaiming_uniform_(cpu_a, a=math.sqrt(5), generator=generator)
                weight_a.copy_(cpu_a)
                module.lora_B[adapter].weight.zero_()


def apply_trainable(model: nn.Module, policy: SharingPolicy) -> None:
    """requires_grad = policy.is_trainable(name) for every parameter; call after anything peft activates."""
    for name, param in model.named_parameters():
        param.requires_grad_(policy.is_trainable(name))


def activate_adapters(model: nn.Module, policy: SharingPolicy, names: Sequence[str]) -> None:
    """Make exactly `names` active (both at once is allowed), then re-apply the policy's requires_grad.

    peft's set_adapter resets requires_grad by its own rule (huggingface/peft#2749), hence the second step.
    """
    unknown = set(names) - set(policy.adapters)
    if unknown or not names:
        raise ValueError(f"cannot activate adapters {list(names)}; policy {policy.name} has {list(policy.adapters)}")
    if not isinstance(model, PeftModel):
        raise TypeError(f"policy {policy.name} has adapters but the model is a {type(model).__name__}")
    model.base_model.set_adapter(list(names))
    apply_trainable(model, policy)


@contextmanager
def adapters_active(model: nn.Module, policy: SharingPolicy, names: Sequence[str]) -> Iterator[None]:
    """Temporarily run with only `names` active (e.g. `("global",)` for the global-only model)."""
    activate_adapters(model, policy, names)
    try:
        yield
    finally:
        activate_adapters(model, policy, policy.adapters)


def first_trained_block(model: nn.Module, policy: SharingPolicy) -> int:
    """Index of the first encoder block holding a trainable parameter: every block before it is frozen prefix."""
    backbone = backbone_of(model)
    for index, block in enumerate(backbone.encoder.blocks):
        prefix = f"encoder.blocks.{index}."
        if any(policy.is_trainable(prefix + name) for name, _ in block.named_parameters()):
            return index
    return backbone.config.depth


def save_site_adapters(model: nn.Module, directory: str | Path, policy: SharingPolicy) -> Path:
    """Write a site's adapters in peft's format (`<dir>/<adapter>/adapter_config.json` + weights) and its heads.

    The heads go to `<dir>/heads.safetensors` under backbone keys (`pred_head_dict.sax.weight`, ...), since they are
    plain modules rather than adapter weights. The directory is written under a temporary name, then renamed.
    """
    directory = Path(directory)
    if not isinstance(model, PeftModel):
        raise TypeError(f"policy {policy.name} has no adapters to save (model is a {type(model).__name__})")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(str(staging), selected_adapters=list(policy.adapters))
        heads = {
            canonical_key(key): value.detach().cpu().contiguous()
            for key, value in model.state_dict().items()
            if policy.part(key) == "head"
        }
        save_file(heads, str(staging / HEADS_FILE))
        (staging / "README.md").unlink(missing_ok=True)
        if directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_site_adapters(model: nn.Module, directory: str | Path, policy: SharingPolicy) -> None:
    """Load what `save_site_adapters` wrote into a model built with the same adapter config and policy."""
    directory = Path(directory)
    if not isinstance(model, PeftModel):
        raise TypeError(f"policy {policy.name} has no adapters to load (model is a {type(model).__name__})")
    for adapter in policy.adapters:
        folder = directory / adapter
        _check_adapter_config(folder / _ADAPTER_CONFIG, model.peft_config[adapter].to_dict())
        weights_path = folder / _ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: missing adapter weights of adapter {adapter!r}")
        weights = load_file(str(weights_path))
        expected = sum(1 for key, _ in model.named_parameters() if f".{adapter}." in key and "lora_" in key)
        if len(weights) != expected:
            raise ValueError(f"{weights_path}: holds {len(weights)} tensors, adapter {adapter!r} has {expected}")
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
        unexpected = [key for key in result.unexpected_keys if "lora_" in key]
        if unexpected:
            raise ValueError(f"{weights_path}: unexpected keys {unexpected[:5]}")
    heads_path = directory / HEADS_FILE
    if not heads_path.is_file():
        raise FileNotFoundError(f"{heads_path}: missing head weights")
    result = backbone_of(model).load_state_dict(load_file(str(heads_path)), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{heads_path}: unexpected keys {result.unexpected_keys}")
    activate_adapters(model, policy, policy.adapters)


def _check_adapter_config(path: Path, live: dict) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing peft adapter config")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable adapter config: {err}") from err
    for field in ("r", "lora_alpha", "target_modules"):
        saved_value, live_value = saved.get(field), live.get(field)
        if field == "target_modules":
            saved_value, live_value = sorted(saved_value or []), sorted(live_value or [])
        if saved_value != live_value:
            raise ValueError(f"{path}: field {field} is {saved_value!r}, the model's adapter has {live_value!r}")
