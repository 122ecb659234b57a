"""The server's export of the federation's global model (models.export format), or a note saying why there is none."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from models.atomic_io import write_text_atomic
from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.dual_lora import DualLoRAConfig, add_adapters
from models.export import backbone_record, input_contract, write_model
from models.metrics import DEFAULT_THRESHOLD
from models.policy import SharingPolicy
from models.protocol import GLOBAL_MODEL_DIR, NO_GLOBAL_MODEL_FILE

LIGHTNING_PREFIX = "model."
"""The LightningModule attribute in front of every exchanged key (DualLoRAClassifier.model)."""


def export_global_model(
    run_dir: str,
    spec: Mapping[str, Any],
    params: Mapping[str, Any],
    pooled: Mapping[str, Any] | None,
    test_figures: Mapping[str, Mapping[str, Any]],
    last_round: int | None,
    replica_seed: int | None = None,
) -> str:
    """Write the global model to `<run_dir>/global_model/` and return its path; for a policy whose shared parts
    are not a usable model, write NO_GLOBAL_MODEL.md saying why and return that path instead.

    `spec` is the job's description of the model (app.site_config.SiteConfig.model_spec), `params` the final
    global state the sites were sent, `pooled` the pooled validation threshold (None when none could be chosen),
    `test_figures` each site's final test figures as the sites sent them, `replica_seed` the seed of the replica
    (custom.controller) the model comes from, which also seeded its adapters.
    """
    policy = SharingPolicy.from_dict(spec["policy"], source="model_spec")
    if not policy.has_global_model:
        path = os.path.join(run_dir, NO_GLOBAL_MODEL_FILE)
        write_text_atomic(path, no_global_model_note(policy))
        return path
    adapter = DualLoRAConfig(**spec["adapter"])
    if replica_seed is not None:
        # the replica's adapters were drawn from its own seed; a part never sent (FFA-LoRA's frozen A) must be too
        adapter = dataclasses.replace(adapter, init_seed=replica_seed)
    model = global_peft_model(spec, policy, params, adapter)
    group = "global_only" if policy.is_dual else "personalised"
    metadata = {
        "kind": "global",
        "site": None,
        "round": last_round,
        "input_contract": input_contract(ConvViTConfig(**spec["convvit"]), spec.get("spacing_mm")),
        "backbone_weights": backbone_record(spec["weights"]),  # hashed here when the server has the file
        "threshold_source": "pooled validation histograms of the sites" if pooled else f"default {DEFAULT_THRESHOLD}",
        "metrics": {
            "validation": {"pooled_threshold": dict(pooled) if pooled else None},
            "test": {site: _group_figures(figures, group) for site, figures in sorted(test_figures.items())},
        },
    }
    if replica_seed is not None:
        metadata["replica_seed"] = replica_seed
    adapters = ("global",) if policy.is_dual else policy.adapters
    threshold = float(pooled["threshold"]) if pooled else DEFAULT_THRESHOLD
    out = os.path.join(run_dir, GLOBAL_MODEL_DIR)
    write_model(out, model, policy, adapter, adapters, threshold, metadata)
    return out


def global_peft_model(
    spec: Mapping[str, Any], policy: SharingPolicy, params: Mapping[str, Any], adapter: DualLoRAConfig
) -> torch.nn.Module:
    """The model the global parameters complete: a ConvViT of the spec's shape (its frozen backbone is never
    written, so it is left at its initialisation) with the policy's adapters drawn as `adapter` draws them (parts
    that are never sent keep that initialisation), loaded with every shared entry."""
    model = add_adapters(ConvViT(ConvViTConfig(**spec["convvit"])), adapter, policy)
    own = model.state_dict()
    state = {key.removeprefix(LIGHTNING_PREFIX): torch.as_tensor(value) for key, value in params.items()}
    unknown = sorted(set(state) - set(own))
    missing = sorted(key for key in own if policy.is_shared(key) and key not in state)
    if unknown or missing:
        raise ValueError(f"the global state does not fit the model: unknown {unknown[:3]}, missing {missing[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def _group_figures(figures: Mapping[str, Any], group: str) -> dict[str, Any]:
    """A site's figures of one model (`global_only_auroc` -> `auroc`), with their subject count `n`."""
    prefix = f"{group}_"
    return {name.removeprefix(prefix): value for name, value in figures.items() if name.startswith(prefix)}


ENCRYPTED_GLOBAL_MODEL_NOTE = """# No global model at the server

The job aggregated the shared keys under homomorphic encryption (custom.secure_aggregation): the server holds the
global model only as ciphertexts, which it cannot read. Every site decrypted it for the final evaluation, and each
site's `personalised_model/` holds the decrypted global adapter beside its own.
"""
"""The server's NO_GLOBAL_MODEL.md when the final global model is encrypted."""


def no_global_model_note(policy: SharingPolicy) -> str:
    """Why the aggregated parts of `policy` are not a model anyone can use on their own."""
    kept = sorted(policy.trainable_parts - policy.shared_parts)
    shared = sorted(policy.shared_parts) or ["nothing"]
    return (
        f"# No global model for {policy.name}\n\n"
        f"The sites share {', '.join(shared)} and keep {', '.join(kept)} to themselves. The aggregated parts alone "
        "are not a complete model (a trained part, such as a LoRA factor or the head, exists only at each site), so "
        "the server exports none. Each site's `personalised_model/` is the usable model of this method.\n"
    )
