"""Add peft LoRA adapters `global` / `local` to a ConvViT and set what trains per policy."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from models.convvit import ConvViT
from models.dual_lora.config import DualLoRAConfig
from models.policy import SharingPolicy, canonical_key, fine_tunes_blocks, get_policy


def build_policy(
    name: str, adapter_config: DualLoRAConfig, depth: int, share_head: bool | None = None
) -> SharingPolicy:
    """The named policy; `fedavg_full` fine-tunes the adapter config's blocks fully instead of adding LoRA."""
    full_blocks = adapter_config.resolve_blocks(depth) if fine_tunes_blocks(name) else None
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
