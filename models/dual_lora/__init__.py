"""Dual LoRA on peft: a shared `global` and a site-private `local` LoRA adapter on chosen ConvViT blocks."""

from models.dual_lora.config import DEFAULT_TARGET_MODULES, DualLoRAConfig
from models.dual_lora.model import (
    activate_adapters,
    adapters_active,
    add_adapters,
    apply_trainable,
    backbone_of,
    build_policy,
    first_trained_block,
    init_adapter,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "DualLoRAConfig",
    "activate_adapters",
    "adapters_active",
    "add_adapters",
    "apply_trainable",
    "backbone_of",
    "build_policy",
    "first_trained_block",
    "init_adapter",
]
