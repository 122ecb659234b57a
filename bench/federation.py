"""`python bench/federation.py`: federation cost as JSON (wall time against centralized, bytes on the wire).

- `fl_vs_central_wall_ratio`: the simulator run of the committed demo job against a Lightning-only centralized run of
  the same model on the pooled data with the same total number of optimizer steps (and so samples), the same
  validation each round and the same final test, each timed from process start to exit. NVFlare's start-up, its
  per-round overhead and the final evaluation are reported separately.
- `payload_vs_raw_bytes_ratio`: serialized bytes a site sends per round against the raw fp32 bytes of the shared
  tensors, as measured by the job's `PayloadMeter` in that run, and computed at CineMA-base by serializing a
  result of the real shapes the same way.
- `shared_vs_full_model_bytes_ratio`: at CineMA-base, the shared tensors against the full model, from the shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import re
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from data_prep.datamodule import VendorDataModule
from jobs.demo import SUBJECTS_PER_VENDOR, prepare_cohort
from jobs.recipe import REPO, FederationConfig, export_job, real_config
from jobs.simulate import run_simulator
from models.protocol import DATA_ENV, SITES, STATE_ENV
from models.standin import RANDOM

COMMITTED_JOB = REPO / "jobs" / "med_duallora"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - (.*)$")


def job_config(local_epochs: int | None = None) -> FederationConfig:
    """The committed job's configuration (the demo configuration), optionally with more local epochs per round."""
    config = FederationConfig.for_method()
    return config if local_epochs is None else config.replace(local_epochs=local_epochs, name="bench_workload")


def site_train_counts(prepared: Path, sites: Sequence[str]) -> dict[str, int]:
    return {site: VendorDataModule(prepared, clients=[site]).num_train_samples for site in sites}


def fl_steps_per_round(counts: dict[str, int], config: FederationConfig) -> int:
    """Optimizer steps all sites together take in one round (last batches are partial, as Lightning does)."""
    return sum(config.site.local_epochs * math.ceil(n / config.site.batch_size) for n in counts.values())


def run_federated(job: Path, prepared: Path, out: Path, threads: int) -> dict:
    """The job in the simulator; wall time split into start-up, rounds and final evaluation."""
    env = {DATA_ENV: str(prepared), STATE_ENV: str(out / f"site_state_t{threads}")}
    started = datetime.now()
    run = run_simulator(job, out / f"ws_t{threads}", SITES, threads, env=env, log_file=out / f"sim_t{threads}.log")
    if run.problems():
        raise RuntimeError(f"simulator run with -t {threads} did not complete: {run.problems()[:5]}")
    ready, round_ends = _server_milestones(run.log())
    marks = [ready, *round_ends]
    rounds = [(b - a).total_seconds() for a, b in zip(marks, marks[1:], strict=False)]
    startup = (ready - started).total_seconds()
    return {
        "simulator_threads": threads,
        "wall_s": round(run.seconds, 2),
        "startup_to_first_round_s": round(startup, 2),
        "round_s": [round(r, 2) for r in rounds],
        "final_eval_and_shutdown_s": round(run.seconds - startup - sum(rounds), 2),
        "up": run.comm_records("up"),
    }


def _server_milestones(log: str) -> tuple[datetime, list[datetime]]:
    """When the server workflow was ready, and when each round's aggregation ended."""
    ready, round_ends = None, []
    for line in log.splitlines():
        match = LOG_TIME.match(line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if ready is None and "Initializing BaseModelController workflow" in match.group(2):
            ready = stamp
        if re.search(r"SharedKeyAggregator - INFO .* round \d+: aggregated", match.group(2)):
            round_ends.append(stamp)
    if ready is None or not round_ends:
        raise RuntimeError("server log lacks the workflow start or the round ends")
    return ready, round_ends


def _central_worker(prepared: str, config: FederationConfig, steps_per_round: int, threads: int, queue) -> None:
    """Centralized run in a fresh process: imports, model, pooled data, then per round validate + train, then test."""
    start = time.monotonic()
    import lightning.pytorch as pl
    import torch

    from app.client import VALIDATE_ONLY_WHEN_ASKED
    from data_prep.datamodule import VendorDataModule
    from models.lit import QUIET_TRAINER_KWARGS

    torch.set_num_threads(threads)
    module = config.site_config.build_module()
    datamodule = VendorDataModule(prepared, clients=None, batch_size=config.site.batch_size, seed=config.site.seed)
    trainer = pl.Trainer(
        max_epochs=10**6,
        max_steps=steps_per_round,
        **QUIET_TRAINER_KWARGS,
        check_val_every_n_epoch=VALIDATE_ONLY_WHEN_ASKED,
    )
    ready = time.monotonic()
    rounds = []
    for index in range(config.rounds):
        round_start = time.monotonic()
        trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit_loop.epoch_loop.max_steps = steps_per_round * (index + 1)
        trainer.fit(module, datamodule=datamodule)
        rounds.append(time.monotonic() - round_start)
    test_start = time.monotonic()
    trainer.test(module, datamodule=datamodule, verbose=False)
    queue.put(
        {
            "model_and_data_setup_s": ready - start,
            "round_s": rounds,
            "test_s": time.monotonic() - test_start,
            "optimizer_steps": trainer.global_step,
        }
    )


def run_central(prepared: Path, config: FederationConfig, steps_per_round: int, threads: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = time.monotonic()
    worker = context.Process(target=_central_worker, args=(str(prepared), config, steps_per_round, threads, queue))
    worker.start()
    result = queue.get(timeout=3600)
    worker.join()
    if worker.exitcode != 0:
        raise RuntimeError(f"centralized run exited with {worker.exitcode}")
    result["wall_s"] = time.monotonic() - start
    accounted = result["model_and_data_setup_s"] + sum(result["round_s"]) + result["test_s"]
    result["process_start_and_imports_s"] = result["wall_s"] - accounted
    return {key: [round(v, 2) for v in value] if isinstance(value, list) else round(value, 2)
            for key, value in result.items()}  # fmt: skip


def base_bytes() -> dict:
    """CineMA-base (random weights, shapes only): shared vs full model bytes, and the serialized payload per round."""
    import torch
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from app.client import full_model_bytes
    from custom.comm import payload_bytes, tensor_bytes

    module = real_config(weights=RANDOM).site_config.build_module()
    shared = {key: value.detach().clone() for key, value in module.shared_state_dict().items()}
    raw, count = tensor_bytes(shared)
    full = full_model_bytes(module)
    metrics = {f"val{kind}_{name}": 0.5 for kind in ("", "_global_only") for name in ("bal_acc", "auroc", "f1")}
    meta = {"num_train_samples": 100, "full_model_bytes": full, "NUM_STEPS_CURRENT_ROUND": 50}
    payload = payload_bytes(FLModelUtils.to_shareable(FLModel(params=shared, metrics=metrics, meta=meta)))
    del module
    torch.cuda.empty_cache()
    return {"shared_tensors": count, "shared_bytes": raw, "full_model_bytes": full, "payload_bytes": payload}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench", help="workspaces and the JSON go here")
    parser.add_argument("--data", default=None, help="prepared root (default: make the demo cohort under --out)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 4], help="simulator -t values to time")
    parser.add_argument("--central-threads", type=int, default=2, help="torch threads of the centralized run")
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help="time a heavier workload: the demo job with this many local epochs (exported under --out)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        prepared = Path(args.data).resolve()
    else:
        prepared = prepare_cohort(out, subjects_per_vendor=SUBJECTS_PER_VENDOR, seed=0)
    config = job_config(args.local_epochs)
    job = COMMITTED_JOB if args.local_epochs is None else export_job(config, out / "jobs")
    counts = site_train_counts(prepared, SITES)
    steps_per_round = fl_steps_per_round(counts, config)
    federated = {t: run_federated(job, prepared, out, t) for t in args.threads}
    central = run_central(prepared, config, steps_per_round, args.central_threads)
    base = base_bytes()
    report = summarize(config, counts, steps_per_round, federated, central, base)
    (out / "federation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def summarize(config, counts, steps_per_round, federated: dict, central: dict, base: dict) -> dict:
    """The JSON report: headline ratios first, then how each number was obtained."""
    central_steady = statistics.mean(central["round_s"][1:])
    fl_runs = {}
    for threads, fl in federated.items():
        fl_steady = statistics.mean(fl["round_s"][1:])
        fl_runs[f"t{threads}"] = {
            **{key: value for key, value in fl.items() if key != "up"},
            "wall_ratio_vs_central": round(fl["wall_s"] / central["wall_s"], 3),
            "steady_round_overhead_s": round(fl_steady - central_steady, 2),
            "first_round_overhead_s": round(fl["round_s"][0] - central["round_s"][0], 2),
        }
    up = next(iter(federated.values()))["up"]
    demo_ratio = statistics.mean(r["payload_bytes"] / r["tensor_bytes"] for r in up)
    headline = fl_runs[f"t{max(federated)}"]
    return {
        "fl_vs_central_wall_ratio": headline["wall_ratio_vs_central"],
        "payload_vs_raw_bytes_ratio": round(base["payload_bytes"] / base["shared_bytes"], 4),
        "shared_vs_full_model_bytes_ratio": round(base["shared_bytes"] / base["full_model_bytes"], 6),
        "details": {
            "job": f"demo job, {config.rounds} rounds x {config.site.local_epochs} local epochs",
            "headline_wall_ratio_from": f"simulator -t {max(federated)} (one process per site, as in deployment)",
            "round_s_meaning": "round 0 includes loading the volumes; later rounds are steady state",
            "federated": fl_runs,
            "centralized": central,
            "same_work": {
                "rounds": config.rounds,
                "local_epochs": config.site.local_epochs,
                "batch_size": config.site.batch_size,
                "site_train_samples": counts,
                "optimizer_steps_fl": steps_per_round * config.rounds,
                "optimizer_steps_central": central["optimizer_steps"],
            },
            "payload_vs_raw_bytes_ratio_demo_micro": round(demo_ratio, 4),
            "demo_bytes_per_round_per_site": {
                "payload": up[0]["payload_bytes"],
                "raw_shared": up[0]["tensor_bytes"],
                "full_model": up[0]["full_model_bytes"],
            },
            "cinema_base": base,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
