"""Sharing policies: a federated method is the set of parameters that train at a site and the subset that leaves it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ADAPTER_NAMES",
    "POLICY_NAMES",
    "SharingPolicy",
    "adapter_of",
    "canonical_key",
    "fine_tunes_blocks",
    "get_policy",
    "parameter_counts",
]

ADAPTER_NAMES = ("global", "local")
POLICY_NAMES = ("med_duallora", "fedit", "ffa_lora", "fedsa_lora", "local_only", "fedavg_full")

# Wrapper prefixes stripped before classification: Lightning attribute, peft PeftModel/LoraModel, DDP, Fabric.
_WRAPPER_PREFIXES = ("model.", "base_model.model.", "module.", "_forward_module.")
_LORA_KEY = re.compile(r"encoder\.blocks\.(\d+)\.(?:attn|mlp)\.\w+\.lora_([AB])\.(\w+)\.weight")
_HEAD_KEY = re.compile(r"pred_head_dict\.(?:sax|cls)\.(?:weight|bias)")
_BLOCK_KEY = re.compile(r"encoder\.blocks\.(\d+)\.[\w.]+")


def canonical_key(key: str) -> str:
    """The backbone-relative key: wrapper prefixes and peft's `.base_layer` removed."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key.replace(".base_layer.", ".")


def adapter_of(key: str) -> str | None:
    """The adapter (`global` or `local`) a LoRA weight belongs to; None for any other key."""
    lora = _LORA_KEY.fullmatch(canonical_key(key))
    return lora.group(3) if lora else None


def key_part(key: str, full_blocks: Iterable[int] = ()) -> str | None:
    """Classify a key as `lora_A.<adapter>`, `lora_B.<adapter>`, `head`, `block` (a block in full_blocks), or None."""
    key = canonical_key(key)
    lora = _LORA_KEY.fullmatch(key)
    if lora:
        return f"lora_{lora.group(2)}.{lora.group(3)}"
    if _HEAD_KEY.fullmatch(key):
        return "head"
    block = _BLOCK_KEY.fullmatch(key)
    if block and "lora_" not in key and int(block.group(1)) in set(full_blocks):
        return "block"
    return None


@dataclass(frozen=True)
class SharingPolicy:
    """What a method trains at a site and what it sends; any key outside `shared_parts` stays at the site.

    Parts are `lora_A.global`, `lora_B.global`, `lora_A.local`, `lora_B.local`, `head` (both linear heads) and
    `block` (every parameter of the encoder blocks listed in `full_blocks`, for full fine-tuning).
    """

    name: str
    adapters: tuple[str, ...]
    trainable_parts: frozenset[str]
    shared_parts: frozenset[str]
    full_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.adapters) - set(ADAPTER_NAMES)
        if unknown:
            raise ValueError(f"policy {self.name}: unknown adapter(s) {sorted(unknown)}; allowed {ADAPTER_NAMES}")
        if not self.shared_parts <= self.trainable_parts:
            extra = sorted(self.shared_parts - self.trainable_parts)
            raise ValueError(f"policy {self.name}: shared parts {extra} are not trainable")
        if ("block" in self.trainable_parts) != bool(self.full_blocks):
            raise ValueError(f"policy {self.name}: the `block` part and full_blocks must be given together")

    @property
    def share_head(self) -> bool:
        """Whether the classification heads are aggregated across sites."""
        return "head" in self.shared_parts

    @property
    def freeze_lora_A(self) -> bool:  # noqa: N802 - LoRA's factor names are A and B
        """True when adapters exist but no `lora_A` trains (FFA-LoRA: A stays at its seeded initialisation)."""
        return bool(self.adapters) and not any(p.startswith("lora_A.") for p in self.trainable_parts)

    @property
    def is_dual(self) -> bool:
        """Whether sites hold both adapters, `global` and `local` (then the global-only model can be scored)."""
        return set(self.adapters) == {"global", "local"}

    @property
    def has_private_parts(self) -> bool:
        """Whether some trained part stays at the site: the site's model is then personalised."""
        return bool(self.trainable_parts - self.shared_parts)

    @property
    def has_global_model(self) -> bool:
        """Whether the aggregated parts make a complete model by themselves: the head and every trained part
        outside the local adapter are shared (not for FedSA-LoRA, local-only, or a local head)."""
        outside_local = {part for part in self.trainable_parts if not part.endswith(".local")}
        return "head" in self.shared_parts and outside_local <= self.shared_parts

    def part(self, key: str) -> str | None:
        """The part a state-dict key belongs to, or None for a frozen or unknown key."""
        return key_part(key, self.full_blocks)

    def is_trainable(self, key: str) -> bool:
        """Whether the parameter under `key` trains at a site."""
        return self.part(key) in self.trainable_parts

    def is_shared(self, key: str) -> bool:
        """Whether `key` may leave the site. Fails closed: an unknown key is never shared."""
        return self.part(key) in self.shared_parts

    def shared_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entries of `state_dict` that this policy shares (keys unchanged)."""
        return {key: value for key, value in state_dict.items() if self.is_shared(key)}

    def to_dict(self) -> dict[str, Any]:
        """The serialised policy (JSON-ready): what a job config, the filter, the aggregator and the site receive."""
        return {
            "name": self.name,
            "adapters": list(self.adapters),
            "trainable_parts": sorted(self.trainable_parts),
            "shared_parts": sorted(self.shared_parts),
            "full_blocks": list(self.full_blocks),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "policy") -> SharingPolicy:
        """The policy `to_dict` wrote. Fails closed: it must be exactly a known method's policy (with its head
        setting and fully tuned blocks), so no hand-edited config can make a method share more than it does."""
        fields = ("name", "adapters", "trainable_parts", "shared_parts", "full_blocks")
        if not isinstance(data, Mapping) or sorted(data) != sorted(fields):
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"{source}: a serialised policy has the fields {list(fields)}, got {got}")
        share_head = "head" in data["shared_parts"]
        expected = get_policy(data["name"], share_head=share_head, full_blocks=data["full_blocks"] or None)
        if expected.to_dict() != {key: data[key] for key in fields}:
            raise ValueError(f"{source}: {dict(data)} is not the {data['name']} policy ({expected.to_dict()})")
        return expected

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description, for logs and reports: the serialised policy and its derived facts."""
        return {
            **self.to_dict(),
            "share_head": self.share_head,
            "freeze_lora_A": self.freeze_lora_A,
            "is_dual": self.is_dual,
            "has_private_parts": self.has_private_parts,
            "has_global_model": self.has_global_model,
        }


def _lora_parts(adapter: str, factors: str = "AB") -> set[str]:
    return {f"lora_{factor}.{adapter}" for factor in factors}


# Per method: adapters, trainable parts (besides the head), shared parts (besides the head), default share_head.
_METHODS: dict[str, tuple[tuple[str, ...], set[str], set[str], bool]] = {
    "med_duallora": (("global", "local"), _lora_parts("global") | _lora_parts("local"), _lora_parts("global"), True),
    "fedit": (("global",), _lora_parts("global"), _lora_parts("global"), True),
    "ffa_lora": (("global",), _lora_parts("global", "B"), _lora_parts("global", "B"), True),
    # FedSA-LoRA: A is shared, B stays private; their GLUE configuration keeps the classifier head private too.
    "fedsa_lora": (("global",), _lora_parts("global"), _lora_parts("global", "A"), False),
    "local_only": (("local",), _lora_parts("local"), set(), False),
    "fedavg_full": ((), {"block"}, {"block"}, True),
}


def fine_tunes_blocks(name: str) -> bool:
    """Whether the method fine-tunes whole encoder blocks (then `get_policy` needs their indices)."""
    if name not in _METHODS:
        raise ValueError(f"unknown sharing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return "block" in _METHODS[name][1]


def get_policy(name: str, share_head: bool | None = None, full_blocks: Iterable[int] | None = None) -> SharingPolicy:
    """The named policy. `share_head` overrides the method's default; `full_blocks` is required by `fedavg_full`."""
    if name not in _METHODS:
        raise ValueError(f"unknown sharing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    adapters, trainable, shared, default_share_head = _METHODS[name]
    share_head = default_share_head if share_head is None else share_head
    if share_head and not shared:
        raise ValueError(f"policy {name} shares nothing; share_head=True contradicts it")
    blocks: tuple[int, ...] = ()
    if fine_tunes_blocks(name):
        if not full_blocks:
            raise ValueError(f"policy {name} needs full_blocks: the encoder block indices to fine-tune fully")
        blocks = tuple(sorted({int(i) for i in full_blocks}))
        if blocks[0] < 0:
            raise ValueError(f"policy {name}: full_blocks must be non-negative indices, got {list(blocks)}")
    elif full_blocks:
        raise ValueError(f"policy {name} adapts LoRA blocks; full_blocks is only for fedavg_full")
    return SharingPolicy(
        name=name,
        adapters=adapters,
        trainable_parts=frozenset(trainable | {"head"}),
        shared_parts=frozenset(shared | ({"head"} if share_head else set())),
        full_blocks=blocks,
    )


def parameter_counts(model: nn.Module, policy: SharingPolicy) -> dict[str, int]:
    """Total, trainable and shared parameter counts of a model under a policy."""
    params = dict(model.named_parameters())
    return {
        "total": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for key, p in params.items() if policy.is_trainable(key)),
        "shared": sum(p.numel() for key, p in params.items() if policy.is_shared(key)),
    }
