"""The benchmark's methods and how one (method, seed) runs: an NVFlare simulator job, or the centralized baseline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.site_config import SiteConfig
from jobs.recipe import FederationConfig, export_job
from jobs.simulate import SimulatorRun, last_epochs_only, run_simulator
from models.dual_lora import DualLoRAConfig
from models.policy import SharingPolicy, parameter_counts
from models.protocol import DATA_ENV, ROUND_METRIC, SITES, STATE_ENV

SIMULATOR_LOG = "simulator.log"
ATTEMPTS = 2
"""Tries of one federated run: a stalled or failed simulator run is started once more in a fresh workspace."""
GLOBAL_KIND_OF_CLIENT = {"personalised": "personalised", "global_only": "global"}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a sharing policy (None = centralized) with its adapter placement and ranks."""

    name: str
    policy: str | None
    description: str
    share_head: bool | None = None
    all_blocks: bool = False
    global_r: int = 8
    local_r: int = 8
    proximal_mu: float = 0.0


def not_evaluable(policy: SharingPolicy) -> dict[str, str]:
    """Model kinds a method's runs cannot be scored with, and why (docs/evaluation.md), from its policy."""
    if policy.has_global_model:
        return {}
    if not policy.shared_parts:
        return {"global": f"{policy.name} shares nothing, so there is no global model"}
    kept = sorted(policy.trainable_parts - policy.shared_parts)
    return {
        "global": f"{policy.name}'s server holds only {sorted(policy.shared_parts)} ({kept} stay at the sites), so "
        "the server model is not a usable classifier"
    }


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("med_duallora", "med_duallora", "global + local LoRA (r 8/8), last 2 blocks, head shared"),
        MethodSpec(
            "med_duallora_all_blocks", "med_duallora", "as med_duallora, adapters in every block", all_blocks=True
        ),
        MethodSpec("med_duallora_head_local", "med_duallora", "as med_duallora, head kept at each site", False),
        MethodSpec(
            "med_duallora_rg4_rl8",
            "med_duallora",
            "as med_duallora, global rank 4 / local rank 8 (alpha 16 for both)",
            global_r=4,
        ),
        MethodSpec("fedit", "fedit", "FedAvg-LoRA: one LoRA (r 8) + head, both averaged"),
        MethodSpec(
            "fedprox_lora",
            "fedit",
            "as fedit, plus FedProx's proximal term (mu 0.1, not tuned) on the shared keys",
            proximal_mu=0.1,
        ),
        MethodSpec("ffa_lora", "ffa_lora", "FFA-LoRA: A frozen at a shared seed, B + head averaged"),
        MethodSpec("fedsa_lora", "fedsa_lora", "FedSA-LoRA: A averaged, B and head private"),
        MethodSpec("local_only", "local_only", "each site trains its own LoRA + head; nothing is sent"),
        MethodSpec("fedavg_full", "fedavg_full", "FedAvg of the last 2 blocks fully fine-tuned + head"),
        MethodSpec("centralized", None, "one LoRA (r 8) + head on the pooled training data, no NVFlare"),
    )
}


@dataclass(frozen=True)
class RunSettings:
    """What every run of a benchmark shares; `prepared_roots[seed]` is the prepared data of that seed's split."""

    prepared_roots: dict[int, Path]
    weights: str = "standin"
    """`standin`, `random` or a checkpoint path (models.standin.resolve_backbone)."""
    backbone: str | None = None
    """ConvViT preset for `random` or a checkpoint without its config.yaml."""
    rounds: int = 5
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 2
    simulator_threads: int = 2
    sites: tuple[str, ...] = SITES
    log: Callable[[str], None] = field(default=print, compare=False)


def run_method(method: MethodSpec, settings: RunSettings, seed: int, run_dir: Path) -> dict[str, Any]:
    """One (method, seed) run: the NVFlare simulator for a federated method, Lightning alone for `centralized`."""
    if method.policy is None:
        return run_centralized(settings, seed, run_dir)
    return run_federated(method, settings, seed, run_dir)


def run_centralized(settings: RunSettings, seed: int, run_dir: Path) -> dict[str, Any]:
    """`app.centralized` on the pooled training data: the fedit model (one LoRA + head), constant lr like the sites.

    It trains rounds x local_epochs epochs, so every training subject is seen as often as in a federated run.
    """
    metrics_path = run_dir / "metrics.json"
    epochs = settings.rounds * settings.local_epochs
    command = [
        sys.executable,
        "-m",
        "app.centralized",
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run_dir / 'lightning'}",
        f"--model.weights={settings.weights}",
        *([f"--model.backbone={settings.backbone}"] if settings.backbone else []),
        "--model.policy=fedit",
        f"--model.lr={settings.lr}",
        "--model.warmup_epochs=0",
        f"--model.min_lr={settings.lr}",
        f'--model.adapter={{"init_seed": {seed}}}',
        f"--data.root={settings.prepared_roots[seed]}",
        f"--data.batch_size={settings.batch_size}",
        f"--data.seed={seed}",
        f"--metrics_out={metrics_path}",
    ]
    settings.log(f"    centralized seed {seed}: {epochs} epochs on the pooled training data")
    with open(run_dir / "centralized.log", "w", encoding="utf-8") as output:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        returncode = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env).returncode
    if returncode != 0 or not metrics_path.exists():
        raise RuntimeError(f"centralized seed {seed}: app.centralized failed ({returncode}); see {run_dir}")
    report = json.loads(metrics_path.read_text(encoding="utf-8"))
    test = report["test"]
    evaluations = [
        {"site": site, "model_kind": "central", "metrics": _defined(metrics), "n": metrics["n"]}
        for site, metrics in test["clients"].items()
    ]
    evaluations.append(
        {"site": "pooled", "model_kind": "central", "metrics": _defined(test["pooled"]), "n": test["pooled"]["n"]}
    )
    counts = _parameter_counts(federation_config(METHODS["fedit"], settings, seed, job_name="centralized"))
    return {
        "evaluations": evaluations,
        "not_evaluable": {},
        "rounds": [],
        "communication": {},
        "params": {"total": counts["total"], "trainable": counts["trainable"], "shared": None},
        "rounds_completed": None,
        "epochs": report["epochs"],
    }


def _defined(metrics: dict[str, Any]) -> dict[str, float]:
    """A metrics dict with JSON nulls (undefined metrics) back as NaN."""
    return {name: math.nan if value is None else float(value) for name, value in metrics.items() if name != "n"}


def federation_config(method: MethodSpec, settings: RunSettings, seed: int, job_name: str) -> FederationConfig:
    """The job configuration of one federated run: the method's policy is built here, once for the run."""
    site = {
        "local_epochs": settings.local_epochs,
        "backbone": settings.backbone,
        "weights": settings.weights,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "seed": seed,
        "threads": 1,
        "proximal_mu": method.proximal_mu,
    }
    depth = SiteConfig(**site).model_config().depth
    adapter = DualLoRAConfig(
        blocks=list(range(depth)) if method.all_blocks else None, global_r=method.global_r, local_r=method.local_r
    )
    return FederationConfig.for_method(
        method.policy,
        method.share_head,
        rounds=settings.rounds,
        min_clients=len(settings.sites),
        sites=settings.sites,
        name=job_name,
        adapter=adapter,
        **site,
    )


def run_federated(method: MethodSpec, settings: RunSettings, seed: int, run_dir: Path) -> dict[str, Any]:
    """Export the method's job, run it in the NVFlare simulator (jobs.simulate), check that it completed, and
    read its artifacts."""
    config = federation_config(method, settings, seed, job_name=f"{method.name}_seed{seed}")
    job_dir = export_job(config, run_dir / "job")
    state = run_dir / "site_state"
    env = {DATA_ENV: str(settings.prepared_roots[seed]), STATE_ENV: str(state)}
    label = f"{method.name} seed {seed}"
    run = run_simulator(
        job_dir,
        run_dir / "workspace",
        settings.sites,
        settings.simulator_threads,
        env=env,
        log_file=run_dir / SIMULATOR_LOG,
        progress=last_epochs_only(lambda line: settings.log(f"    {label}: {line}")),
        attempts=ATTEMPTS,
        clear_before_retry=[state],
    )
    problems = run.problems()
    if problems:
        raise RuntimeError(f"{label}: the federated run did not complete: {problems[:3]}; see {run_dir}")
    return {
        "evaluations": _site_evaluations(run, config.policy.has_private_parts),
        "not_evaluable": not_evaluable(config.policy),
        "rounds": _round_metrics(run.server_dir / "tb_events", settings.sites),
        "communication": _communication(run),
        "params": _parameter_counts(config),
        "rounds_completed": settings.rounds,
    }


def _site_evaluations(run: SimulatorRun, has_private_parts: bool) -> list[dict[str, Any]]:
    """Every site's test-split scores, per model kind (docs/evaluation.md, "Run record").

    The client's `personalised` model of a method without private parts is the global model, and is named so.
    """
    evaluations = []
    for site in run.sites:
        path = run.test_metrics_path(site)
        report = run.test_metrics(site)
        for client_kind, metrics in report["models"].items():
            kind = GLOBAL_KIND_OF_CLIENT[client_kind] if has_private_parts else "global"
            evaluations.append(_evaluation(site, kind, metrics, report, client_kind, path))
    return evaluations


def _evaluation(site: str, kind: str, metrics: dict, report: dict, client_kind: str, path: Path) -> dict[str, Any]:
    predictions = report.get("predictions", {}).get(client_kind)
    if predictions is None:
        return {"site": site, "model_kind": kind, "metrics": metrics, "n": report["n_test"]}
    try:
        return {
            "site": site,
            "model_kind": kind,
            "subject_ids": [entry["subject_id"] for entry in predictions],
            "labels": [int(entry["label"]) for entry in predictions],
            "scores": [float(entry["p_diseased"]) for entry in predictions],
            "threshold": float(report["thresholds"][client_kind]),
        }
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: field predictions.{client_kind} is malformed ({error})") from error


def _round_metrics(tb_root: Path, sites: Sequence[str]) -> list[dict[str, Any]]:
    """Per round and site, the balanced accuracy of the site's model validated before local training.

    Read from the TensorBoard events the sites stream to the server (`tb_events/<site>/`, tag `val_bal_acc`, step =
    round); NaN where the site's validation split lacks a class.
    """
    rounds = []
    for site in sites:
        events = EventAccumulator(str(tb_root / site), size_guidance={"scalars": 0})
        events.Reload()
        if ROUND_METRIC in events.Tags()["scalars"]:
            rounds += [{"round": e.step, "site": site, "bal_acc": e.value} for e in events.Scalars(ROUND_METRIC)]
    return rounds


def _communication(run: SimulatorRun) -> dict[str, Any]:
    """Bytes the sites sent (serialized payloads measured by the server), in total and per site per round."""
    records = run.comm_records("up")
    sent = [int(record["payload_bytes"]) for record in records]
    full = next((record["full_model_bytes"] for record in records if record.get("full_model_bytes")), None)
    return {
        "bytes_sent_total": sum(sent),
        "bytes_sent_per_client_round": sum(sent) / len(sent) if sent else 0.0,
        "payloads": len(sent),
        "sites": len(run.sites),
        "full_model_bytes": full,
    }


def _parameter_counts(config: FederationConfig) -> dict[str, int]:
    """Total, trainable and shared parameters of one site's model, built exactly as the site builds it."""
    module = config.site_config.build_module()
    return parameter_counts(module.model, module.policy)
