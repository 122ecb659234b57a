"""DualLoRAClassifier: the LightningModule shared by the federated client and the centralized baseline."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from torchmetrics.functional import classification as tmf

from models.config import ConvViTConfig
from models.dp import DPConfig, PrivacyLedger, make_private
from models.dual_lora import (
    DualLoRAConfig,
    adapters_active,
    add_adapters,
    backbone_of,
    build_policy,
    first_trained_block,
)
from models.loading import load_cinema
from models.metrics import DEFAULT_THRESHOLD, METRIC_NAMES, choose_threshold, detection_metrics
from models.policy import SharingPolicy
from models.prefix_cache import DEFAULT_CACHE_BYTES, PrefixCache, run_frozen_prefix
from models.standin import resolve_backbone

__all__ = [
    "CINEMA_CLASSES",
    "HEALTHY_CLASS",
    "METRIC_NAMES",
    "DualLoRAClassifier",
    "detection_metrics",
    "flatten_metrics",
]

# CineMA's pathology class lists (cinema/classification/{acdc,mnms,mnms2}/config.yaml).
CINEMA_CLASSES: dict[str, list[str]] = {
    "acdc": ["DCM", "HCM", "MINF", "NOR", "RV"],
    "mnms": ["DCM", "HCM", "NOR", "ARV", "HHD"],
    "mnms2": ["ARR", "CIA", "FALL", "HCM", "LV", "NOR"],
}
HEALTHY_CLASS = "NOR"


def _multiclass_metrics(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    n_classes = probs.shape[1]
    return {
        "mc_bal_acc": tmf.multiclass_recall(probs, targets, n_classes, average="macro").item(),
        "mc_mcc": tmf.multiclass_matthews_corrcoef(probs, targets, n_classes).item(),
        "mc_f1": tmf.multiclass_f1_score(probs, targets, n_classes, average="macro").item(),
    }


def flatten_metrics(prefix: str, grouped: Mapping[str, Any]) -> dict[str, float]:
    """Logged names: pooled `{prefix}_{metric}`, per client `{prefix}_{client}_{metric}`, counts as `..._n`."""
    flat = {f"{prefix}_{name}": float(value) for name, value in grouped["pooled"].items()}
    for client, metrics in grouped["clients"].items():
        flat.update({f"{prefix}_{client}_{name}": float(value) for name, value in metrics.items()})
    return flat


DECISION_RULE = (
    "diseased when P(diseased) > threshold (strictly greater, as models.metrics.detection_metrics calls it)"
)
"""How a threshold decides, in evaluation and in `predict_step` alike."""

# Trainer settings shared by every in-process fit (site rounds, pretraining, benches): no logs, checkpoints or bars.
QUIET_TRAINER_KWARGS: dict[str, object] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


def _as_tensor(value: Any) -> torch.Tensor | None:
    """`value` as a tensor, None when it cannot be one (a string, a dict, ragged lists)."""
    if isinstance(value, str | bytes):
        return None
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class EvalBatch(NamedTuple):
    """One evaluated batch, kept until the epoch ends: logits, class targets, and each subject's client and id."""

    logits: torch.Tensor
    targets: torch.Tensor
    clients: list[str]
    subject_ids: list[str]


class DualLoRAClassifier(pl.LightningModule):
    """CineMA ConvViT with the policy's peft adapters, trained with CE and evaluated per client and pooled.

    `self.model` is the PeftModel (or the bare ConvViT for `fedavg_full`), so state-dict keys read
    `model.base_model.model.encoder.blocks.10.attn.q.lora_A.global.weight` and
    `model.base_model.model.pred_head_dict.sax.weight` (`model.encoder.blocks.10...` for `fedavg_full`).
    Checkpoints keep only trainable parameters; on load, the frozen entries come from the backbone rebuilt from
    `weights`, so loading stays strict.
    """

    def __init__(
        self,
        backbone: str = "micro",
        backbone_overrides: dict[str, Any] | None = None,
        cinema_config: str | None = None,
        weights: str | None = None,
        adapter: DualLoRAConfig | None = None,
        policy: str | Mapping[str, Any] | SharingPolicy = "med_duallora",
        task: Literal["binary", "multiclass"] = "binary",
        classes: str | list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        max_epochs: int = 10,
        min_lr: float = 1e-5,
        label_smoothing: float = 0.1,
        class_weights: Literal["inverse_frequency"] | list[float] | None = None,
        use_prefix_cache: bool = True,
        cache_train_prefix: bool = False,
        prefix_cache_bytes: int = DEFAULT_CACHE_BYTES,
        eval_global_only: bool = False,
        grad_ckpt: bool = False,
        proximal_mu: float = 0.0,
        dp: DPConfig | None = None,
    ) -> None:
        """
        Args:
            backbone: ConvViT preset (`micro`, `small`, `tiny`, `base`, ...); ignored when `cinema_config` is set.
            backbone_overrides: ConvViTConfig fields overriding the preset (e.g. `image_size`).
            cinema_config: a CineMA downstream config.yaml describing the backbone.
            weights: local CineMA `.safetensors` (fine-tuned or pretrained MAE); `standin` = the committed stand-in
                with its config; None or `random` = a random backbone, with a loud warning.
            adapter: placement and size of the LoRA adapters (default: r=8, alpha=16, q/kv/proj, last two blocks).
            policy: the run's sharing policy, as built once for the run (a SharingPolicy or its `to_dict` form,
                which a federated site receives from the job), or a method name (models.policy.POLICY_NAMES) with its
                defaults, as the centralized baseline's config gives it.
            task: `binary` (label 0 = NOR, 1 = diseased) or `multiclass` on the batch's `pathology`.
            classes: multiclass class list, or a CineMA dataset name (`acdc`, `mnms`, `mnms2`); must contain NOR.
            lr, weight_decay, warmup_epochs, max_epochs, min_lr: AdamW (no decay on 1-D params), linear warm-up
                then cosine to min_lr at max_epochs, updated every optimiser step.
            label_smoothing: of the cross-entropy.
            class_weights: per-class CE weights, or `inverse_frequency` from the datamodule's `train_class_counts`
                (normalised to sum to the number of classes).
            use_prefix_cache: reuse frozen-prefix features per subject in validation and test.
            cache_train_prefix: also in training; only worth it without random augmentation (exact either way).
            prefix_cache_bytes: memory bound of the prefix cache.
            eval_global_only: also evaluate with the local adapter disabled, logged as `{stage}_global_only_*`.
            grad_ckpt: gradient checkpointing of the encoder blocks (for the base size on GPU).
            proximal_mu: FedProx weight: adds (mu/2)·||w - w_round_start||² over the trained shared parameters,
                w_round_start being their values when fitting starts (the received global model); 0 = off.
            dp: DP-SGD (models.dp) on every trainable parameter: per-sample clipping and Gaussian noise, Poisson
                sampling of the training batches (the datamodule's `poisson_sampling`), the steps entered in
                `self.privacy`; None = off.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "dp"])
        if dp is not None and proximal_mu:
            raise ValueError("dp and proximal_mu cannot be combined: FedProx's term escapes DP-SGD's clipping")
        self.dp = dp
        self.privacy = PrivacyLedger()
        self.dp_noise_multiplier: float | None = None
        self._dp_hooks: Any = None
        self.adapter_config = adapter or DualLoRAConfig()
        self.class_names = self._class_names(task, classes)
        n_classes = len(self.class_names) if self.class_names else 2
        weights, cinema_config = resolve_backbone(weights, cinema_config)
        if cinema_config is not None:
            model_config = ConvViTConfig.from_cinema_yaml(cinema_config, n_classes=n_classes)
        else:
            model_config = ConvViTConfig.preset(backbone, **{"n_classes": n_classes, **(backbone_overrides or {})})
        self.policy = self._resolve_policy(policy, model_config.depth)
        self.hparams["policy"] = self.policy.to_dict()
        convvit = load_cinema(weights, model_config)
        convvit.set_grad_ckpt(grad_ckpt)
        if eval_global_only and not self.policy.is_dual:
            raise ValueError(
                f"eval_global_only needs both adapters; policy {self.policy.name} has {list(self.policy.adapters)}"
            )
        self.model = add_adapters(convvit, self.adapter_config, self.policy)
        self.start_block = first_trained_block(self.model, self.policy)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if use_prefix_cache or cache_train_prefix else None
        self.register_buffer("class_weight", self._fixed_class_weights(class_weights, n_classes), persistent=False)
        self._eval_outputs: dict[str, list[EvalBatch]] = defaultdict(list)
        self.eval_results: dict[str, dict[str, Any]] = {}  # last evaluation per prefix (`test`, `val_global_only`)
        self.eval_predictions: dict[str, list[dict[str, Any]]] = {}  # per subject, same prefixes
        # Decision thresholds, chosen on validation data (choose_thresholds) and used by every later evaluation:
        # `model` for the module as it is, `global_only` for its global adapter alone.
        self.thresholds: dict[str, float] = {"model": DEFAULT_THRESHOLD, "global_only": DEFAULT_THRESHOLD}
        self._proximal_anchor: dict[str, torch.Tensor] = {}

    def _resolve_policy(self, policy: str | Mapping[str, Any] | SharingPolicy, depth: int) -> SharingPolicy:
        if isinstance(policy, SharingPolicy):
            return policy
        if isinstance(policy, Mapping):
            return SharingPolicy.from_dict(policy, source="DualLoRAClassifier(policy=...)")
        # A method name: this run's one construction of its policy (the centralized baseline's config).
        return build_policy(policy, self.adapter_config, depth)

    @staticmethod
    def _class_names(task: str, classes: str | list[str] | None) -> list[str] | None:
        if task == "binary":
            if classes is not None:
                raise ValueError("classes is only for task=multiclass; binary labels are 0 = NOR, 1 = diseased")
            return None
        if task != "multiclass":
            raise ValueError(f"task must be 'binary' or 'multiclass', got {task!r}")
        if classes is None:
            raise ValueError(f"task=multiclass needs classes: a list or one of {sorted(CINEMA_CLASSES)}")
        names = CINEMA_CLASSES.get(classes) if isinstance(classes, str) else list(classes)
        if names is None:
            raise ValueError(f"classes {classes!r} is not a CineMA dataset; choose one of {sorted(CINEMA_CLASSES)}")
        if HEALTHY_CLASS not in names or len(set(names)) != len(names):
            raise ValueError(f"classes {names} must be distinct and contain {HEALTHY_CLASS}")
        return names

    @staticmethod
    def _fixed_class_weights(class_weights: str | Sequence[float] | None, n_classes: int) -> torch.Tensor | None:
        if class_weights is None or class_weights == "inverse_frequency":
            return None
        if isinstance(class_weights, str) or len(class_weights) != n_classes:
            raise ValueError(
                f"class_weights must be 'inverse_frequency' or {n_classes} numbers, got {class_weights!r}"
            )
        return torch.tensor([float(w) for w in class_weights])

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.class_weights == "inverse_frequency":
            counts = getattr(self.trainer.datamodule, "train_class_counts", None)
            if self.class_names is not None or counts is None:
                raise ValueError(
                    "class_weights=inverse_frequency needs a binary task and datamodule.train_class_counts"
                )
            counts = torch.as_tensor([float(counts[c]) for c in range(2)])
            if (counts == 0).any():
                raise ValueError(
                    f"class_weights=inverse_frequency: a class has no training sample ({counts.tolist()})"
                )
            inverse = 1.0 / counts
            self.class_weight = (inverse * len(counts) / inverse.sum()).to(self.device)

    # ---- forward -------------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, subject_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Logits; the frozen prefix runs without autograd and, given subject ids, through the prefix cache."""
        convvit = backbone_of(self.model)
        if subject_ids is not None and self.prefix_cache is not None:
            prefix = self.prefix_cache.features(convvit, images, list(subject_ids), self.start_block)
        else:
            prefix = run_frozen_prefix(convvit, images, self.start_block)
        return convvit.forward_suffix(prefix, self.start_block)

    def _targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.class_names is None:
            return batch["label"].long()
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted({p for p in batch["pathology"] if p not in index})
        if unknown:
            raise ValueError(f"pathology {unknown} not in classes {self.class_names} (subjects {batch['subject_id']})")
        return torch.tensor([index[p] for p in batch["pathology"]], device=self.device)

    def p_diseased(self, logits: torch.Tensor) -> torch.Tensor:
        """P(diseased) per row of `logits`: class 1 of a binary head, else 1 - P(healthy)."""
        probs = logits.float().softmax(dim=1)
        if self.class_names is None:
            return probs[:, 1]
        return 1.0 - probs[:, self.class_names.index(HEALTHY_CLASS)]

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=self.class_weight, label_smoothing=self.hparams.label_smoothing)

    # ---- steps ---------------------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """FedProx: remember the shared parameters as fitting starts (NVFlare's callback has loaded the global
        model by then: callback hooks run before the module's)."""
        if self.hparams.proximal_mu > 0:
            self._proximal_anchor = {
                name: parameter.detach().clone()
                for name, parameter in self.named_parameters()
                if parameter.requires_grad and self.policy.is_shared(name)
            }

    def proximal_term(self) -> torch.Tensor:
        """(mu/2)·||w - w_round_start||² over the trained shared parameters (0 without FedProx)."""
        if not self._proximal_anchor:
            return torch.zeros((), device=self.device)
        parameters = dict(self.named_parameters())
        squared = sum(((parameters[name] - anchor) ** 2).sum() for name, anchor in self._proximal_anchor.items())
        return 0.5 * self.hparams.proximal_mu * squared

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        subject_ids = batch.get("subject_id") if self.hparams.cache_train_prefix else None
        logits = self(batch["image"], subject_ids)
        if not len(logits):
            # An empty Poisson batch (DP-SGD): still one step, of noise alone, as the accountant counts it.
            return logits.sum() * 0.0
        loss = self._loss(logits, self._targets(batch))
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(logits))
        if self._proximal_anchor:
            proximal = self.proximal_term()
            self.log("train_proximal", proximal, batch_size=len(logits))
            loss = loss + proximal
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int = 0) -> list[dict[str, Any]]:
        """Per study: `{"study_id", "p_diseased", "diseased"}` at `thresholds["model"]` (DECISION_RULE).

        No prefix cache: a study id is not a subject id, and unlabelled studies are scored once.
        """
        p_diseased = self.p_diseased(self(batch["image"]))
        called = p_diseased > self.thresholds["model"]  # on the float32 tensor, as torchmetrics compares
        return [
            {"study_id": str(study), "p_diseased": float(p), "diseased": bool(c)}
            for study, p, c in zip(batch["study_id"], p_diseased.tolist(), called.tolist(), strict=True)
        ]

    def _eval_step(self, stage: str, batch: Mapping[str, Any]) -> None:
        subject_ids = batch.get("subject_id") if self.hparams.use_prefix_cache else None
        targets = self._targets(batch)
        clients = list(batch.get("client", ["all"] * len(targets)))
        subjects = [str(subject) for subject in batch.get("subject_id", [""] * len(targets))]
        logits = self(batch["image"], subject_ids)
        self.log(f"{stage}_loss", self._loss(logits, targets), batch_size=len(targets))
        self._eval_outputs[stage].append(EvalBatch(logits.detach().float().cpu(), targets.cpu(), clients, subjects))
        if self.hparams.eval_global_only:
            with adapters_active(self.model, self.policy, ("global",)):
                global_logits = self(batch["image"], subject_ids)
            self._eval_outputs[f"{stage}_global_only"].append(
                EvalBatch(global_logits.detach().float().cpu(), targets.cpu(), clients, subjects)
            )

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def _log_eval_metrics(self, stage: str) -> None:
        for prefix, kind in ((stage, "model"), (f"{stage}_global_only", "global_only")):
            outputs = self._eval_outputs.pop(prefix, [])
            if outputs:
                self.eval_results[prefix] = self.grouped_metrics(outputs, self.thresholds[kind])
                self.eval_predictions[prefix] = self.subject_predictions(outputs)
                self.log_dict(flatten_metrics(prefix, self.eval_results[prefix]), batch_size=1)

    def choose_thresholds(self, stage: str = "val") -> dict[str, float]:
        """Set `thresholds` from the last `stage` evaluation's pooled predictions (choose_threshold) and return them.

        A site calls it after validating its personalised model; the pooled threshold of a federated global model
        comes from summed histograms instead (custom.controller).
        """
        for prefix, kind in ((stage, "model"), (f"{stage}_global_only", "global_only")):
            rows = self.eval_predictions.get(prefix)
            if rows:
                self.thresholds[kind] = choose_threshold([r["p_diseased"] for r in rows], [r["label"] for r in rows])
        return dict(self.thresholds)

    def subject_predictions(self, outputs: list[EvalBatch]) -> list[dict[str, Any]]:
        """One entry per evaluated subject: id, client, binary label (1 = diseased) and P(diseased)."""
        healthy = self.class_names.index(HEALTHY_CLASS) if self.class_names else 0
        return [
            {"subject_id": subject, "client": client, "label": int(target != healthy), "p_diseased": float(p)}
            for batch in outputs
            for subject, client, target, p in zip(
                batch.subject_ids,
                batch.clients,
                batch.targets.tolist(),
                self.p_diseased(batch.logits).tolist(),
                strict=True,
            )
        ]

    def grouped_metrics(self, outputs: list[EvalBatch], threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
        """`{"pooled": metrics, "clients": {client: metrics}}` at `threshold`, each with its subject count `n`."""
        logits = torch.cat([o.logits for o in outputs])
        targets = torch.cat([o.targets for o in outputs])
        clients = [c for o in outputs for c in o.clients]
        per_client = {}
        for client in sorted(set(clients)):
            mask = torch.tensor([c == client for c in clients])
            metrics = self._metrics(logits[mask], targets[mask], threshold)
            per_client[client] = {**metrics, "n": int(mask.sum())}
        pooled = {**self._metrics(logits, targets, threshold), "n": len(clients)}
        return {"pooled": pooled, "clients": per_client}

    def _metrics(self, logits: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict[str, float]:
        p_diseased = self.p_diseased(logits)
        if self.class_names is None:
            return detection_metrics(p_diseased, targets, threshold)
        healthy = self.class_names.index(HEALTHY_CLASS)
        return {
            **detection_metrics(p_diseased, (targets != healthy).long(), threshold),
            **_multiclass_metrics(logits.softmax(1), targets),
        }

    # ---- optimisation --------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": self.hparams.weight_decay},
            {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams.lr, betas=(0.9, 0.95))
        if self.dp is not None:
            optimizer = self._private(optimizer)
        steps_per_epoch = self._steps_per_epoch()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step / steps_per_epoch))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _private(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`optimizer` under DP-SGD for this fit: σ spends the budget over all rounds at this sampling rate."""
        datamodule = self.trainer.datamodule
        if not getattr(datamodule, "poisson_sampling", False):
            raise ValueError(
                "DP-SGD needs Poisson-sampled training batches: build the datamodule with poisson_sampling"
            )
        sample_rate = datamodule.batch_size / datamodule.num_train_samples
        steps_per_round = int(self.trainer.max_epochs) * len(datamodule.train_dataloader())
        self.dp_noise_multiplier = self.dp.noise_multiplier(sample_rate, steps_per_round)
        self._dp_hooks, optimizer = make_private(
            self.model,
            optimizer,
            self.dp,
            self.dp_noise_multiplier,
            expected_batch_size=datamodule.batch_size,
            sample_rate=sample_rate,
            ledger=self.privacy,
        )
        return optimizer

    def on_train_end(self) -> None:
        """Remove DP-SGD's per-sample hooks: the next round's fit attaches its own."""
        if self._dp_hooks is not None:
            self._dp_hooks.cleanup()
            self._dp_hooks = None

    def _steps_per_epoch(self) -> float:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.max_epochs or trainer.max_epochs < 1:
            return 1.0
        return max(1.0, float(trainer.estimated_stepping_batches) / trainer.max_epochs)

    def lr_factor(self, epoch: float) -> float:
        """Multiplier of lr at a (fractional) epoch: linear warm-up, then cosine down to min_lr at max_epochs."""
        warmup, total = self.hparams.warmup_epochs, self.hparams.max_epochs
        if epoch < warmup:
            return (epoch + 1e-3) / warmup
        progress = min(1.0, (epoch - warmup) / max(total - warmup, 1e-8))
        floor = self.hparams.min_lr / self.hparams.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # ---- state exchanged with NVFlare and checkpoints --------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable entry (`model.`-prefixed keys), e.g. a site's private state to persist."""
        return {key: value for key, value in self.state_dict().items() if self.policy.is_trainable(key)}

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The entries the policy lets leave the site (`model.`-prefixed keys)."""
        return self.policy.shared_state_dict(self.state_dict())

    def global_model_problems(self, state: Mapping[str, Any]) -> list[str]:
        """Why `state` is not a global model of this module's policy (empty when it is one): every key must be
        shared by the policy and exist here, every shared key must be there, and each value must be a floating
        tensor or array of this module's shape."""
        own = self.shared_state_dict()
        problems = []
        refused = sorted(key for key in state if not self.policy.is_shared(key))
        if refused:
            problems.append(f"policy {self.policy.name} does not share keys {refused[:5]} ({len(refused)} in all)")
        unknown = sorted(key for key in state if self.policy.is_shared(key) and key not in own)
        if unknown:
            problems.append(f"keys not in this model: {unknown[:5]}")
        missing = sorted(set(own) - set(state))
        if missing:
            problems.append(f"shared keys missing: {missing[:5]} ({len(missing)} in all)")
        for key in sorted(set(state) & set(own)):
            value = _as_tensor(state[key])
            if value is None or not value.is_floating_point() or tuple(value.shape) != tuple(own[key].shape):
                described = type(state[key]).__name__ if value is None else f"{value.dtype} {tuple(value.shape)}"
                problems.append(f"{key} is {described}, this model has {own[key].dtype} {tuple(own[key].shape)}")
        return problems

    def load_shared_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an aggregated global model after checking it against the policy (`global_model_problems`)."""
        problems = self.global_model_problems(state)
        if problems:
            raise ValueError("not a global model of this site's policy: " + "; ".join(problems))
        self.load_state_dict({key: torch.as_tensor(value) for key, value in state.items()}, strict=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.policy.is_trainable(k)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Complete a trainable-only checkpoint with this module's frozen entries (rebuilt from `weights`)."""
        saved = checkpoint["state_dict"]
        current = self.state_dict()
        missing = sorted(key for key in current if self.policy.is_trainable(key) and key not in saved)
        if missing:
            raise ValueError(f"checkpoint lacks trainable keys {missing[:5]} ({len(missing)} in all)")
        checkpoint["state_dict"] = {**{k: v for k, v in current.items() if not self.policy.is_trainable(k)}, **saved}
