"""The benchmark's methods and how a method runs for several seeds: one NVFlare simulator job whose replicas are the
seeds, or the centralized baseline once per seed; each seed's result becomes the body of a benchmark record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.site_config import SiteConfig
from data_prep.splits import REFERENCE_SUFFIX, REFERENCE_TEST_SPLIT
from experiments.records import rounded
from jobs.poc import PocNetwork
from jobs.recipe import FederationConfig, export_job
from jobs.simulate import SimulatorRun, last_epochs_only, run_simulator
from models.dual_lora import DualLoRAConfig
from models.export import read_metadata
from models.policy import SharingPolicy, parameter_counts
from models.protocol import DATA_ENV, SEED_PLACEHOLDER, SITES, STATE_ENV, replica_folder

SIMULATOR_LOG = "simulator.log"
ATTEMPTS = 2
"""Tries of one federated run: a stalled or failed simulator run is started once more in a fresh workspace."""
POC_TIMEOUT_S = 3 * 3600
"""How long a benchmark unit on a POC network (secure aggregation) may run."""
GLOBAL_KIND_OF_CLIENT = {"personalised": "personalised", "global_only": "global"}
CENTRAL_MODEL = "model"
"""The centralized baseline's exported model (models.export format), in its run folder."""
SCORED_SPLITS = ("test", REFERENCE_TEST_SPLIT, "val")
"""What a record keeps of every scored model: its test scores, those of the Siemens-profile renderings of the same
test hearts, and its validation scores (the pre-registration's criterion; the threshold's source)."""


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
    compression: str | None = None
    """Transport codec of the training rounds (FederationConfig.compression)."""
    dp_epsilon: float = 0.0
    """DP-SGD budget of each site over the run (SiteConfig.dp_epsilon; 0 = off), at δ = SiteConfig.dp_delta."""
    secure_aggregation: bool = False
    """Homomorphic encryption of the shared keys (FederationConfig.secure_aggregation): runs on a POC network, as
    the simulator cannot load provisioned contexts."""
    base: str | None = None
    """For a variant (VARIANTS): the METHODS entry it changes one thing of, which it is compared against."""


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
VARIANTS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "med_duallora_fp16",
            "med_duallora",
            "as med_duallora, each training round's weights sent as float16 both ways",
            compression="fp16",
            base="med_duallora",
        ),
        MethodSpec(
            "med_duallora_int8",
            "med_duallora",
            "as med_duallora, each training round's weights sent as blockwise int8 (256 values a block) both ways",
            compression="int8",
            base="med_duallora",
        ),
        *(
            MethodSpec(
                f"{base}_dp{epsilon:g}",
                base,
                f"as {base}, under DP-SGD at every site: ε = {epsilon:g} over the run at δ = 1e-5, every trainable "
                "parameter clipped per sample (C = 1, not tuned) and noised",
                dp_epsilon=epsilon,
                base=base,
            )
            for base in ("med_duallora", "ffa_lora")
            for epsilon in (8.0, 1.0)
        ),
        MethodSpec(
            "med_duallora_he",
            "med_duallora",
            "as med_duallora, aggregated under homomorphic encryption (CKKS contexts from NVFlare's HEBuilder): the "
            "server sums the sites' encrypted updates; run on a POC network",
            secure_aggregation=True,
            base="med_duallora",
        ),
    )
}
"""Transport and privacy options of a method (#14): each is compared with its `base` method, not ranked in the
headline table."""
ALL_METHODS = METHODS | VARIANTS


@dataclass(frozen=True)
class RunSettings:
    """What every run of a benchmark shares. `data` is the prepared root of each seed, `{seed}` standing for the
    seed (e.g. `.../prepared_seed{seed}`); the hyperparameters are the pre-registered ones."""

    data: str
    weights: str = "standin"
    """`standin`, `random` or a checkpoint path (models.standin.resolve_backbone)."""
    backbone: str | None = None
    """ConvViT preset for `random` or a checkpoint without its config.yaml."""
    rounds: int = 5
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 2
    simulator_threads: int = len(SITES)
    """Sites trained at once. Fewer threads than sites makes NVFlare restart a site process for every task."""
    sites: tuple[str, ...] = SITES
    log: Callable[[str], None] = field(default=print, compare=False)

    def root(self, seed: int) -> Path:
        return Path(self.data.replace(SEED_PLACEHOLDER, str(seed)))


def run_unit(method: MethodSpec, settings: RunSettings, seeds: Sequence[int], unit_dir: Path) -> dict[int, dict]:
    """Every seed of one method: the body of each seed's benchmark record (experiments.records), by seed."""
    if method.policy is None:
        return {seed: run_centralized(settings, seed, centralized_run_dir(unit_dir, seed)) for seed in seeds}
    return run_federated(method, settings, seeds, unit_dir)


def centralized_run_dir(unit_dir: Path, seed: int) -> Path:
    """Where the centralized baseline of `seed` runs; its exported model is in `CENTRAL_MODEL` there."""
    return unit_dir / f"seed{seed}"


def run_centralized(settings: RunSettings, seed: int, run_dir: Path) -> dict[str, Any]:
    """`app.centralized` on the pooled training data: the fedit model (one LoRA + head), constant lr like the sites.

    It trains rounds x local_epochs epochs, so every training subject is seen as often as in a federated run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
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
        f"--data.root={settings.root(seed)}",
        f"--data.batch_size={settings.batch_size}",
        f"--data.seed={seed}",
        f"--metrics_out={metrics_path}",
        f"--model_out={run_dir / CENTRAL_MODEL}",
    ]
    settings.log(f"    centralized seed {seed}: {epochs} epochs on the pooled training data")
    started = time.monotonic()
    with open(run_dir / "centralized.log", "w", encoding="utf-8") as output:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        returncode = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env).returncode
    if returncode != 0 or not metrics_path.exists():
        raise RuntimeError(f"centralized seed {seed}: app.centralized failed ({returncode}); see {run_dir}")
    report = json.loads(metrics_path.read_text(encoding="utf-8"))
    threshold = float(report["threshold"])
    sites = {}
    predictions = report["predictions"]
    for site in settings.sites:
        rows = {split: [row for row in predictions.get(split, []) if row["client"] == site] for split in SCORED_SPLITS}
        sites[site] = _site_entry({"central": (threshold, rows)})
    counts = _parameter_counts(federation_config(METHODS["fedit"], settings, seed, job_name="centralized"))
    return {
        "sites": sites,
        "rounds": [],
        "cost": {
            "params": {"total": counts["total"], "trainable": counts["trainable"], "shared": None},
            "bytes_sent_per_client_round": None,
            "job_wall_s": time.monotonic() - started,
            "seeds_in_job": 1,
            "epochs": report["epochs"],
        },
        "not_evaluable": {},
    }


def federation_config(
    method: MethodSpec, settings: RunSettings, seed: int, job_name: str, replica_seeds: Sequence[int] = ()
) -> FederationConfig:
    """The job configuration of one federated run (or of several seeds as replicas): the method's policy is built
    here, once for the run."""
    site = {
        "local_epochs": settings.local_epochs,
        "backbone": settings.backbone,
        "weights": settings.weights,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "seed": seed,
        "threads": 1,
        "proximal_mu": method.proximal_mu,
        "dp_epsilon": method.dp_epsilon,
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
        replica_seeds=tuple(replica_seeds),
        compression=method.compression,
        secure_aggregation=method.secure_aggregation,
        **site,
    )


def run_federated(method: MethodSpec, settings: RunSettings, seeds: Sequence[int], unit_dir: Path) -> dict[int, dict]:
    """One NVFlare simulator job running every seed as a replica (one seed: an ordinary job), checked complete from
    its artifacts; each seed's scores, curves and costs."""
    replicas = tuple(seeds) if len(seeds) > 1 else ()
    config = federation_config(method, settings, seeds[0], job_name=method.name, replica_seeds=replicas)
    job_dir = export_job(config, unit_dir / "job")
    state = unit_dir / "site_state"
    env = {DATA_ENV: settings.data, STATE_ENV: str(state)}
    label = f"{method.name} seeds {' '.join(map(str, seeds))}"
    if config.secure_aggregation:
        settings.log(f"    {label}: on a POC network with provisioned CKKS contexts")
        with PocNetwork(unit_dir / "poc", settings.sites, env=env, homomorphic_encryption=True) as network:
            run = network.run_artifacts(job_dir, timeout=POC_TIMEOUT_S, replica_seeds=replicas)
    else:
        run = run_simulator(
            job_dir,
            unit_dir / "workspace",
            settings.sites,
            settings.simulator_threads,
            env=env,
            log_file=unit_dir / SIMULATOR_LOG,
            progress=last_epochs_only(lambda line: settings.log(f"    {label}: {line}")),
            attempts=ATTEMPTS,
            clear_before_retry=[state],
        )
    problems = run.problems()
    if problems:
        raise RuntimeError(f"{label}: the federated run did not complete: {problems[:3]}; see {unit_dir}")
    params = _parameter_counts(config)
    records = {}
    for seed in seeds:
        replica = seed if replicas else None
        records[seed] = {
            "sites": {site: _federated_site(run, site, replica, config.policy) for site in settings.sites},
            "rounds": _round_metrics(run.server_dir / "tb_events", settings.sites, replica),
            "cost": {
                "params": params,
                "bytes_sent_per_client_round": _bytes_per_client_round(run),
                "job_wall_s": run.seconds,
                "seeds_in_job": len(seeds),
            },
            "not_evaluable": not_evaluable(config.policy),
        }
        if config.site.dp_config() is not None:
            records[seed]["privacy"] = _privacy(run, settings.sites, replica)
    return records


def _privacy(run: SimulatorRun, sites: Sequence[str], seed: int | None) -> dict[str, Any]:
    """The ε each site spent (its exported model's metadata) and their maximum: each patient is at one site, so the
    run is (max ε, δ)-DP for any one patient (docs/privacy.md)."""
    spent = {site: read_metadata(run.personalised_model_dir(site, seed))["privacy"] for site in sites}
    deltas = {entry["delta"] for entry in spent.values()}
    if len(deltas) != 1:
        raise ValueError(f"the sites report different deltas {sorted(deltas)}")
    per_site = {site: float(entry["epsilon"]) for site, entry in spent.items()}
    return {"delta": deltas.pop(), "epsilon_per_site": per_site, "epsilon": max(per_site.values())}


def _federated_site(run: SimulatorRun, site: str, seed: int | None, policy: SharingPolicy) -> dict[str, Any]:
    """A site's scored models from its test_metrics.json. The client's `personalised` model of a method without
    private parts is the global model, and is named so."""
    path = run.test_metrics_path(site, seed)
    report = run.test_metrics(site, seed)
    sections = {
        "test": report,
        "val": report.get("validation", {}),
        REFERENCE_TEST_SPLIT: report.get(REFERENCE_TEST_SPLIT, {}),
    }
    try:
        models = {}
        for client_kind in report["predictions"]:
            kind = GLOBAL_KIND_OF_CLIENT[client_kind] if policy.has_private_parts else "global"
            rows = {split: section.get("predictions", {}).get(client_kind, []) for split, section in sections.items()}
            models[kind] = (float(report["thresholds"][client_kind]), rows)
        return _site_entry(models)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: field predictions is malformed ({error})") from error


def _site_entry(models: Mapping[str, tuple[float, Mapping[str, Sequence[Mapping[str, Any]]]]]) -> dict[str, Any]:
    """A record's site entry from each scored model's (threshold, {split: prediction rows}): the test and validation
    ids and labels in one order each, and per model its threshold and scores in those orders, on the test subjects,
    their Siemens-profile renderings (paired by id) and the validation subjects."""
    first = next(iter(models.values()))[1]
    entry: dict[str, Any] = {"models": {}}
    for split in ("test", "val"):
        entry[f"{split}_ids"] = [row["subject_id"] for row in first[split]]
        entry[f"{split}_labels"] = [int(row["label"]) for row in first[split]]
    for kind, (threshold, rows) in models.items():
        model: dict[str, Any] = {"threshold": threshold}
        for split in SCORED_SPLITS:
            if not rows.get(split):
                continue
            scores = {row["subject_id"].removesuffix(REFERENCE_SUFFIX): row["p_diseased"] for row in rows[split]}
            order = entry["val_ids" if split == "val" else "test_ids"]
            model[split] = rounded(scores[subject] for subject in order)
        entry["models"][kind] = model
    return entry


def _round_metrics(tb_root: Path, sites: Sequence[str], seed: int | None) -> list[dict[str, Any]]:
    """Per round and site, the validation AUROC and balanced accuracy of the site's model before local training,
    from the TensorBoard events the sites stream to the server (tags prefixed `seed<N>/` in a job of replicas)."""
    prefix = f"{replica_folder(seed)}/" if seed is not None else ""
    curves: dict[tuple[int, str], dict[str, Any]] = {}
    for site in sites:
        events = EventAccumulator(str(tb_root / site), size_guidance={"scalars": 0})
        events.Reload()
        for metric in ("auroc", "bal_acc"):
            tag = f"{prefix}val_{metric}"
            if tag in events.Tags()["scalars"]:
                for event in events.Scalars(tag):
                    curves.setdefault((event.step, site), {"round": event.step, "site": site})[metric] = event.value
    return [curves[key] for key in sorted(curves)]


def _bytes_per_client_round(run: SimulatorRun) -> float:
    """Serialized bytes a site sent per round (as the server measured them); the job's replicas all send the same
    tensors, so the mean over the job is each replica's."""
    sent = [int(record["payload_bytes"]) for record in run.comm_records("up")]
    return sum(sent) / len(sent) if sent else 0.0


def _parameter_counts(config: FederationConfig) -> dict[str, int]:
    """Total, trainable and shared parameters of one site's model, built exactly as the site builds it."""
    module = config.site_config.build_module()
    return parameter_counts(module.model, module.policy)
