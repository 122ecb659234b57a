"""DualLoRAConfig: placement and size of the `global` and `local` peft LoRA adapters on a ConvViT."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig

__all__ = ["DEFAULT_TARGET_MODULES", "DualLoRAConfig"]

DEFAULT_TARGET_MODULES = ("attn.q", "attn.kv", "attn.proj")


@dataclass
class DualLoRAConfig:
    """Where the adapters sit and how large each one is; `global` and `local` have their own rank, alpha, dropout."""

    blocks: list[int] | None = field(
        default=None,
        metadata={"help": "Encoder block indices to adapt; negative indices count from the end. None = the last two."},
    )
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Linear modules inside each adapted block, relative to the block (attn.q, attn.kv, ...)."},
    )
    global_r: int = field(default=8, metadata={"help": "Rank of the shared `global` adapter."})
    global_alpha: float = field(default=16.0, metadata={"help": "Alpha of the `global` adapter (scale alpha/r)."})
    global_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the `global` adapter."})
    local_r: int = field(default=8, metadata={"help": "Rank of the site-private `local` adapter."})
    local_alpha: float = field(default=16.0, metadata={"help": "Alpha of the `local` adapter (scale alpha/r)."})
    local_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the `local` adapter."})
    init_seed: int = field(
        default=0,
        metadata={"help": "Seed of the adapters' A initialisation; the same at every site (FFA-LoRA relies on it)."},
    )

    def __post_init__(self) -> None:
        for adapter in ("global", "local"):
            if self.rank(adapter) < 1:
                raise ValueError(f"DualLoRAConfig.{adapter}_r must be >= 1, got {self.rank(adapter)}")
            dropout = getattr(self, f"{adapter}_dropout")
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"DualLoRAConfig.{adapter}_dropout must be in [0, 1), got {dropout}")
        if not self.target_modules:
            raise ValueError("DualLoRAConfig.target_modules must name at least one module (e.g. attn.q)")
        if self.blocks is not None and not self.blocks:
            raise ValueError("DualLoRAConfig.blocks must list at least one block, or be None for the last two")

    def rank(self, adapter: str) -> int:
        """The rank r of an adapter."""
        return int(getattr(self, f"{adapter}_r"))

    def scaling(self, adapter: str) -> float:
        """alpha / r of an adapter: the factor in front of B·A."""
        return float(getattr(self, f"{adapter}_alpha")) / self.rank(adapter)

    def resolve_blocks(self, depth: int) -> tuple[int, ...]:
        """The sorted, non-negative block indices for an encoder of `depth` blocks."""
        wanted = self.blocks if self.blocks is not None else [-2, -1]
        resolved = set()
        for index in wanted:
            if not -depth <= index < depth:
                raise ValueError(f"DualLoRAConfig.blocks: index {index} is outside an encoder of depth {depth}")
            resolved.add(index % depth)
        return tuple(sorted(resolved))

    def module_names(self, depth: int) -> list[str]:
        """Full names of the targeted linear modules, e.g. `encoder.blocks.10.attn.q`."""
        return [f"encoder.blocks.{i}.{target}" for i in self.resolve_blocks(depth) for target in self.target_modules]

    def lora_config(self, adapter: str, depth: int) -> LoraConfig:
        """The peft LoraConfig of one adapter (`global` or `local`)."""
        if adapter not in ("global", "local"):
            raise ValueError(f"unknown adapter {adapter!r}; the adapters are 'global' and 'local'")
        return LoraConfig(
            r=self.rank(adapter),
            lora_alpha=getattr(self, f"{adapter}_alpha"),
            lora_dropout=getattr(self, f"{adapter}_dropout"),
            target_modules=self.module_names(depth),
            bias="none",
        )
