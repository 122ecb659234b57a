"""SiteConfig: how every site of a run builds, trains and evaluates its model; serialised once into the job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.config import CINEMA_SPACING_MM, ConvViTConfig, cinema_yaml_spacing
from models.dp import DPConfig
from models.dual_lora import DualLoRAConfig, build_policy
from models.lit import DualLoRAClassifier
from models.policy import POLICY_NAMES, SharingPolicy, get_policy
from models.standin import RANDOM, STANDIN, resolve_backbone

SITE_CONFIG_FILE = "site_config.json"
"""The serialised SiteConfig in an exported job's app folder, beside the site script."""
SCHEMA = "med-duallora/site-config/1"
"""The first field of the serialised form. A scalar first on purpose: `nvflare job submit` rewrites every JSON file
in an app folder, and a file whose first value is an object comes out as that object alone (NVFlare 2.9)."""
AUTO_PRECISION = "auto"
DEFAULT_PRESET = "micro"
"""The ConvViT preset of a random backbone or a checkpoint given without its config.yaml."""


def _help(text: str, **options: Any) -> Any:
    return field(metadata={"help": text}, **options)


@dataclass
class SiteConfig:
    """Every setting of a site's model, training and data; the job exporter, the benchmark and the site script all
    read this one object (the site from its JSON form in the job). The defaults are the committed CPU demo job."""

    policy: SharingPolicy = _help(
        "The run's sharing policy, built once for the run (SiteConfig.for_method).",
        default_factory=lambda: get_policy("med_duallora"),
    )
    run_name: str = _help("Names the site-state folder of the run; the job name.", default="med_duallora")
    weights: str = _help(
        f"`{STANDIN}` (the committed stand-in with its config), `{RANDOM}` (a random backbone, said loudly), or a "
        "CineMA .safetensors path at the site ($VARS expanded there).",
        default=STANDIN,
    )
    cinema_config: str | None = _help(
        "CineMA config.yaml of the weights, at the site (not with standin).", default=None
    )
    backbone: str | None = _help(
        f"ConvViT preset without a config.yaml: micro, mini, small, base (default {DEFAULT_PRESET}).", default=None
    )
    adapter: DualLoRAConfig = _help(
        "Placement and ranks of the LoRA adapters; its init_seed follows `seed`.", default_factory=DualLoRAConfig
    )
    lr: float = _help("AdamW learning rate, constant (every round starts a fresh optimiser).", default=1e-3)
    weight_decay: float = _help("AdamW weight decay (not on 1-D parameters).", default=0.05)
    label_smoothing: float = _help("Label smoothing of the cross-entropy.", default=0.1)
    class_weights: str | None = _help(
        "`inverse_frequency` (class-balanced loss from the site's training split) or None.",
        default="inverse_frequency",
    )
    local_epochs: int = _help(
        "Epochs over the site's training split per round. The demo's 20 (about 8 s a round on 2 CPU cores) keep "
        "NVFlare's fixed cost (about 20 s a run) from dominating (bench/federation.py).",
        default=20,
    )
    batch_size: int = _help("Subjects per batch.", default=2)
    augment: bool = _help("CineMA's training augmentation (flips, rotation, shift, intensity).", default=True)
    num_workers: int = _help("DataLoader worker processes at the site.", default=0)
    seed: int = _help(
        "The run seed: adapters' A initialisation (identical at every site), head, data order, augmentation.",
        default=0,
    )
    threads: int = _help(
        "torch CPU threads at the site (0 = torch's default; 1 when simulated sites share a machine).", default=1
    )
    proximal_mu: float = _help(
        "FedProx mu (0 = off). NVFlare's FedAvg sends it and its Lightning callback applies it when every trained "
        "key is shared; otherwise the site adds the term over its shared keys only.",
        default=0.0,
    )
    use_prefix_cache: bool = _help("Reuse frozen-prefix features per subject in validation and test.", default=True)
    grad_ckpt: bool = _help(
        "Activation (gradient) checkpointing of the encoder blocks: less GPU memory for CineMA-base, more compute.",
        default=False,
    )
    dp_epsilon: float = _help(
        "DP-SGD at the site (docs/privacy.md): the (epsilon, dp_delta) budget the whole run may spend, every "
        "trainable parameter clipped per sample and noised (Opacus); 0 = off.",
        default=0.0,
    )
    dp_delta: float = _help("DP-SGD's delta.", default=1e-5)
    dp_max_grad_norm: float = _help("DP-SGD's per-sample gradient clipping bound (L2).", default=1.0)
    dp_rounds: int = _help(
        "The rounds the DP budget spans: the job's rounds (FederationConfig sets it; 0 = not set).", default=0
    )
    precision: str = _help(
        f"Lightning precision at the site: `{AUTO_PRECISION}` (bf16-mixed on a GPU, 32-true on CPU), `32-true`, "
        "`bf16-mixed`, `16-mixed`.",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.adapter.init_seed != self.seed:
            self.adapter = dataclasses.replace(self.adapter, init_seed=self.seed)
        if self.dp_epsilon and self.proximal_mu:
            # Opacus noises the per-sample gradients only: a proximal term's gradient would leave unclipped.
            raise ValueError("dp_epsilon and proximal_mu cannot be combined: FedProx's term escapes DP-SGD's clipping")

    def dp_config(self) -> DPConfig | None:
        """The site's DP-SGD budget, None when DP is off."""
        if not self.dp_epsilon:
            return None
        if self.dp_rounds < 1:
            raise ValueError("dp_epsilon is set but dp_rounds is not: the budget must know how many rounds it spans")
        return DPConfig(self.dp_epsilon, self.dp_delta, self.dp_max_grad_norm, self.dp_rounds)

    # ---- construction --------------------------------------------------------------------------------------------

    @classmethod
    def for_method(cls, method: str, share_head: bool | None = None, **settings: Any) -> SiteConfig:
        """The configuration of a method: its policy built once, for the model these settings describe (for
        `fedavg_full`, the adapter config's blocks are the fully tuned ones)."""
        config = cls(**settings)
        policy = build_policy(method, config.adapter, config.model_config().depth, share_head)
        return dataclasses.replace(config, policy=policy)

    def replace(self, **changes: Any) -> SiteConfig:
        return dataclasses.replace(self, **changes)

    # ---- serialisation -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        values.update(policy=self.policy.to_dict(), adapter=dataclasses.asdict(self.adapter))
        return {"schema": SCHEMA, **dict(sorted(values.items()))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "site config") -> SiteConfig:
        """The configuration `to_dict` wrote; an unknown field is an error naming `source` and the field."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{source}: field schema is {data.get('schema')!r}, expected {SCHEMA!r}")
        known = {item.name for item in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key != "schema"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        if "policy" in values:
            values["policy"] = SharingPolicy.from_dict(values["policy"], source=f"{source}: field policy")
        if "adapter" in values:
            adapter_fields = {item.name for item in dataclasses.fields(DualLoRAConfig)}
            unknown = sorted(set(values["adapter"]) - adapter_fields)
            if unknown:
                raise ValueError(f"{source}: field adapter: unknown field(s) {unknown}")
            values["adapter"] = DualLoRAConfig(**values["adapter"])
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> SiteConfig:
        """The configuration in a JSON file (an exported job's `site_config.json`)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable site configuration ({error})") from error
        return cls.from_dict(data, source=str(path))

    # ---- the model -----------------------------------------------------------------------------------------------

    def backbone_files(self, check_weights: bool = True) -> tuple[str | None, str | None]:
        """(weights, config.yaml) of the site model: the stand-in's checked files, none for `random`, or the site's
        own files ($VARS expanded; a file that is not there is an error, never a random fallback). Without
        `check_weights` a weights path is returned as given (the model's shape needs only the config)."""
        if self.weights == STANDIN and self.backbone:
            raise ValueError(f"weights {STANDIN} comes with its own config: drop backbone")
        if self.cinema_config and self.backbone:
            raise ValueError("give cinema_config or backbone, not both")
        config = _site_file("cinema_config", self.cinema_config) if self.cinema_config else None
        weights = self.weights
        if check_weights and weights not in (STANDIN, RANDOM):
            weights = _site_file("weights", weights)
        return resolve_backbone(weights, config)

    def model_config(self) -> ConvViTConfig:
        """The ConvViT dimensions the site model will have (from the config.yaml, else the preset)."""
        _, config = self.backbone_files(check_weights=False)
        return (
            ConvViTConfig.from_cinema_yaml(config) if config else ConvViTConfig.preset(self.backbone or DEFAULT_PRESET)
        )

    def model_spec(self) -> dict[str, Any]:
        """What the server needs to export the global model without the backbone (custom.global_export): the
        model's shape, adapters and policy, the backbone weights as configured, and the input spacing of the
        backbone's config."""
        _, config = self.backbone_files(check_weights=False)
        model_config = self.model_config()
        spec = {
            "convvit": dataclasses.asdict(dataclasses.replace(model_config, n_classes=2)),
            "adapter": dataclasses.asdict(self.adapter),
            "policy": self.policy.to_dict(),
            # as configured only: the server hashes the file if it has it (a job carries no path, and NVFlare's
            # secret scan flags a 64-hex-digit value in a job config)
            "weights": self.weights,
            "spacing_mm": list(cinema_yaml_spacing(config) if config else CINEMA_SPACING_MM),
        }
        return json.loads(json.dumps(spec))  # JSON's own types: the job config holds it as the server reads it

    def trainer_precision(self) -> str:
        """The Lightning precision a site's trainers use (`auto`: bf16-mixed where CUDA is, else 32-true)."""
        if self.precision != AUTO_PRECISION:
            return self.precision
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"

    @property
    def site_proximal_mu(self) -> float:
        """The proximal weight the site applies itself: only when some trained key stays at the site (otherwise
        NVFlare's FedProx, sent by the server, covers every trained key)."""
        return self.proximal_mu if self.policy.has_private_parts else 0.0

    def build_module(self) -> DualLoRAClassifier:
        """The site's LightningModule, seeded by the run seed (a local head starts equal at every site)."""
        weights, config = self.backbone_files()
        torch.manual_seed(self.seed)
        return DualLoRAClassifier(
            backbone=self.backbone or DEFAULT_PRESET,
            cinema_config=config,
            weights=weights,
            adapter=self.adapter,
            policy=self.policy,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_epochs=0.0,
            min_lr=self.lr,
            max_epochs=self.local_epochs,
            label_smoothing=self.label_smoothing,
            class_weights=self.class_weights,
            use_prefix_cache=self.use_prefix_cache,
            eval_global_only=self.policy.is_dual,
            grad_ckpt=self.grad_ckpt,
            proximal_mu=self.site_proximal_mu,
            dp=self.dp_config(),
        )


def _site_file(name: str, value: str) -> str:
    """A path setting with environment variables expanded; a file that is not there is an error."""
    path = os.path.expandvars(value)
    if "$" in path or not os.path.isfile(path):
        raise FileNotFoundError(f"{name} {value!r} -> {path!r}: no such file at this site (no random fallback)")
    return path


# ---- the same settings as command-line options (jobs/job.py) ----------------------------------------------------

_NOT_OPTIONS = {"policy", "adapter", "run_name"}
_ADAPTER_OPTIONS = ("blocks", "global_r", "global_alpha", "global_dropout", "local_r", "local_alpha", "local_dropout")


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per SiteConfig field (and per adapter field), with the field's help text and default."""
    group = parser.add_argument_group("site settings (SiteConfig)")
    group.add_argument("--method", default="med_duallora", choices=POLICY_NAMES, help="the sharing policy")
    group.add_argument("--share-head", choices=("default", "yes", "no"), default="default")
    for item in dataclasses.fields(SiteConfig):
        if item.name not in _NOT_OPTIONS:
            _add_option(group, item, getattr(SiteConfig, item.name, None))
    adapter_defaults = DualLoRAConfig()
    for item in dataclasses.fields(DualLoRAConfig):
        if item.name in _ADAPTER_OPTIONS:
            _add_option(group, item, getattr(adapter_defaults, item.name))


def _add_option(group: Any, item: dataclasses.Field, default: Any) -> None:
    """One option for a dataclass field on an argparse group (its help text, its default, booleans as --x/--no-x)."""
    flag = "--" + item.name.replace("_", "-")
    text = item.metadata.get("help", "")
    if item.name == "blocks":
        group.add_argument(flag, default=None, help=text + " Comma-separated.")
    elif isinstance(default, bool):
        group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=text)
    else:
        kind = type(default) if default is not None else str
        group.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")


def site_config_from_arguments(args: argparse.Namespace, **overrides: Any) -> SiteConfig:
    """The SiteConfig the options of `add_site_arguments` describe; `overrides` win over the options."""
    values = {
        item.name: getattr(args, item.name) for item in dataclasses.fields(SiteConfig) if item.name not in _NOT_OPTIONS
    }
    adapter = {name: getattr(args, name) for name in _ADAPTER_OPTIONS}
    if adapter["blocks"] is not None:
        adapter["blocks"] = [int(block) for block in str(adapter["blocks"]).split(",")]
    values.update(overrides)
    share_head = {"default": None, "yes": True, "no": False}[args.share_head]
    return SiteConfig.for_method(args.method, share_head, adapter=DualLoRAConfig(**adapter), **values)
