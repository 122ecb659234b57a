"""The benchmark's methods and how one (method, seed) runs: an NVFlare simulator job, or the centralized baseline."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIMULATOR_LOG = "simulator.log"
POLL_SECONDS = 2.0
STALL_SECONDS = 240.0
"""A simulator whose logs stay silent this long is stuck (e.g. a site worker lost to a port clash, `OSError: [Errno
98] Address already in use`, while the server waits for every site) and is stopped."""
ATTEMPTS = 2
"""Tries of one federated run: a stalled or failed simulator run is started once more in a fresh workspace."""
ROUND_MARKER = "Round "
FINISHED_MARKER = "Finished FedAvg."
TEST_METRICS_FILE = "test_metrics.json"
ROUND_METRIC = "val_bal_acc"
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

    def not_evaluable(self) -> dict[str, str]:
        """Model kinds this method cannot be scored with, and why (docs/evaluation.md)."""
        if self.policy == "fedsa_lora":
            return {
                "global": "FedSA-LoRA's server holds only the averaged A matrices (B and the head stay at the sites, "
                "B starts at 0), so the server model is not a usable classifier"
            }
        if self.policy == "local_only":
            return {"global": "local-only shares nothing, so there is no global model"}
        return {}


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
    sites: tuple[str, ...] = ("siemens", "philips", "ge", "canon")
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


def federation_config(method: MethodSpec, settings: RunSettings, seed: int, job_name: str):
    """The job configuration of one federated run (jobs.recipe.FederationConfig)."""
    from jobs.recipe import FederationConfig
    from models.config import ConvViTConfig
    from models.standin import resolve_backbone

    _, config = resolve_backbone(settings.weights)
    model = ConvViTConfig.from_cinema_yaml(config) if config else ConvViTConfig.preset(settings.backbone or "micro")
    blocks = list(range(model.depth)) if method.all_blocks else None
    return FederationConfig(
        method=method.policy,
        share_head=method.share_head,
        rounds=settings.rounds,
        local_epochs=settings.local_epochs,
        backbone=settings.backbone,
        weights=settings.weights,
        blocks=blocks,
        global_r=method.global_r,
        local_r=method.local_r,
        lr=settings.lr,
        batch_size=settings.batch_size,
        seed=seed,
        threads=1,
        min_clients=len(settings.sites),
        proximal_mu=method.proximal_mu,
        sites=settings.sites,
        name=job_name,
    )


def run_federated(method: MethodSpec, settings: RunSettings, seed: int, run_dir: Path) -> dict[str, Any]:
    """Export the method's job, run it in the NVFlare simulator, check it finished, and read its artifacts."""
    from jobs.recipe import export_job

    config = federation_config(method, settings, seed, job_name=f"{method.name}_seed{seed}")
    job_dir = export_job(config, run_dir / "job")
    workspace = run_dir / "workspace"
    env = dict(os.environ)
    env.update(
        MED_DUALLORA_DATA=str(settings.prepared_roots[seed]),
        MED_DUALLORA_STATE=str(run_dir / "site_state"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    command = [
        _nvflare_executable(),
        "simulator",
        str(job_dir),
        "-w",
        str(workspace),
        "-c",
        ",".join(settings.sites),
        "-t",
        str(settings.simulator_threads),
    ]
    label = f"{method.name} seed {seed}"
    log_path = run_dir / SIMULATOR_LOG
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _run_with_round_progress(command, env, log_path, workspace, settings.rounds, label, settings.log)
            server_dir = _server_run_dir(workspace)
            _check_finished(workspace, server_dir, settings.sites)
            break
        except RuntimeError as error:
            if attempt == ATTEMPTS:
                raise
            settings.log(f"    {label}: attempt {attempt} failed ({error}); starting again in a fresh workspace")
            log_path.rename(log_path.with_name(f"{SIMULATOR_LOG}.attempt{attempt}"))
            for leftover in (workspace, run_dir / "site_state"):
                shutil.rmtree(leftover, ignore_errors=True)
    return {
        "evaluations": _site_evaluations(workspace, settings.sites, _has_private_parts(config)),
        "not_evaluable": method.not_evaluable(),
        "rounds": _round_metrics(server_dir / "tb_events", settings.sites),
        "communication": _communication(server_dir / "comm" / "bytes_up.json", len(settings.sites)),
        "params": _parameter_counts(config),
        "rounds_completed": settings.rounds,
    }


def _nvflare_executable() -> str:
    beside_python = Path(sys.executable).with_name("nvflare")
    found = str(beside_python) if beside_python.exists() else shutil.which("nvflare")
    if not found:
        raise FileNotFoundError(f"no `nvflare` command next to {sys.executable} or on PATH")
    return found


def _run_with_round_progress(
    command: Sequence[str],
    env: dict[str, str],
    log_path: Path,
    workspace: Path,
    rounds: int,
    label: str,
    log: Callable[[str], None],
    stall_seconds: float = STALL_SECONDS,
) -> None:
    """Run the simulator with its output in log_path, reporting each round the server starts.

    A run whose output and server log stay unchanged for `stall_seconds` is stopped, with every process working in
    its workspace, and raises RuntimeError.
    """
    server_log = workspace / "server" / "log.txt"
    reported = -1
    with open(log_path, "w", encoding="utf-8") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        last_sizes, last_change = None, time.monotonic()
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            latest = _latest_round(server_log)
            if latest is not None and latest > reported:
                reported = latest
                log(f"    {label}: round {latest + 1}/{rounds}")
            sizes = tuple(path.stat().st_size if path.exists() else -1 for path in (log_path, server_log))
            if sizes != last_sizes:
                last_sizes, last_change = sizes, time.monotonic()
            elif time.monotonic() - last_change > stall_seconds:
                _stop_processes_in(workspace, process)
                raise RuntimeError(
                    f"{label}: the simulator made no progress for {stall_seconds:.0f} s; see {log_path}"
                )
    if process.returncode != 0:
        raise RuntimeError(f"{label}: the NVFlare simulator exited with {process.returncode}; see {log_path}")


def _stop_processes_in(workspace: Path, process: subprocess.Popen) -> None:
    """Kill the simulator and its site workers (which NVFlare starts in sessions of their own)."""
    import psutil

    process.kill()
    process.wait()
    for candidate in psutil.process_iter(["cmdline"]):
        if str(workspace) in " ".join(candidate.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                candidate.kill()


def _latest_round(server_log: Path) -> int | None:
    if not server_log.exists():
        return None
    latest = None
    for line in server_log.read_text(encoding="utf-8", errors="replace").splitlines():
        position = line.find(ROUND_MARKER)
        if position >= 0 and line.rstrip(" -").endswith("started."):
            number = line[position + len(ROUND_MARKER) :].split(" ", 1)[0]
            if number.isdigit():
                latest = int(number)
    return latest


def _server_run_dir(workspace: Path) -> Path:
    candidates = sorted(path.parent for path in (workspace / "server").glob("*/app_server"))
    if len(candidates) != 1:
        raise RuntimeError(f"{workspace}/server: expected one job run directory, found {candidates}")
    return candidates[0]


def _check_finished(workspace: Path, server_dir: Path, sites: Sequence[str]) -> None:
    """Completion from the artifacts, not the exit code: the server finished, every site wrote its test metrics."""
    server_log = workspace / "server" / "log.txt"
    if FINISHED_MARKER not in server_log.read_text(encoding="utf-8", errors="replace"):
        raise RuntimeError(f"{server_log}: no {FINISHED_MARKER!r}: the federation did not complete")
    missing = [site for site in sites if not list((workspace / site).glob(f"*/{TEST_METRICS_FILE}"))]
    if missing:
        raise RuntimeError(f"{workspace}: no {TEST_METRICS_FILE} from site(s) {missing}: the final evaluation failed")


def _has_private_parts(config) -> bool:
    """Whether a site keeps trained parameters of its own: only then is its model personalised."""
    from jobs.recipe import site_policy

    policy = site_policy(config)
    return bool(policy.trainable_parts - policy.shared_parts)


def _site_evaluations(workspace: Path, sites: Sequence[str], has_private_parts: bool) -> list[dict[str, Any]]:
    """Every site's test-split scores, per model kind (docs/evaluation.md, "Run record").

    The client's `personalised` model of a method without private parts is the global model, and is named so.
    """
    evaluations = []
    for site in sites:
        (path,) = (workspace / site).glob(f"*/{TEST_METRICS_FILE}")
        report = json.loads(path.read_text(encoding="utf-8"))
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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rounds = []
    for site in sites:
        events = EventAccumulator(str(tb_root / site), size_guidance={"scalars": 0})
        events.Reload()
        if ROUND_METRIC in events.Tags()["scalars"]:
            rounds += [{"round": e.step, "site": site, "bal_acc": e.value} for e in events.Scalars(ROUND_METRIC)]
    return rounds


def _communication(path: Path, n_sites: int) -> dict[str, Any]:
    """Bytes the sites sent (serialized payloads measured by the server), in total and per site per round."""
    records = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    sent = [int(record["payload_bytes"]) for record in records]
    full = next((record["full_model_bytes"] for record in records if record.get("full_model_bytes")), None)
    return {
        "bytes_sent_total": sum(sent),
        "bytes_sent_per_client_round": sum(sent) / len(sent) if sent else 0.0,
        "payloads": len(sent),
        "sites": n_sites,
        "full_model_bytes": full,
    }


def _parameter_counts(config) -> dict[str, int]:
    """Total, trainable and shared parameters of one site's model, built exactly as the site builds it."""
    from app.client import build_module
    from jobs.recipe import site_arguments
    from models.policy import parameter_counts

    module = build_module(site_arguments(config))
    return parameter_counts(module.model, module.policy)
