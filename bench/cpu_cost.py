"""CPU cost of the real job's training: CineMA-base dual-LoRA seconds per step and peak RSS, and per epoch.

`python bench/cpu_cost.py` prints one JSON line. Each (batch size, prefix cache, precision, checkpointing)
measurement runs in a fresh subprocess with torch's default threads: it builds the `med_duallora`
DualLoRAClassifier on a random CineMA-base backbone (192x192x16, 2 frames; random because CineMA's weights cannot be
downloaded, which changes neither speed nor memory), runs `--warmup` untimed and `--steps` timed optimiser steps
(the module's own `training_step`, backward, AdamW over the adapters and heads; bench.gpu's helpers), and reports
the median and fastest step, the process CPU seconds per step, the 1-minute load average (other work on a shared
CPU slows the wall time) and the `resource.getrusage` peak RSS. Cache on = the steady state of `cache_train_prefix`
(every subject cached; its first, warm-up step is a miss); off = the frozen prefix runs every step. The real job's
settings (rounds, local epochs, batch size, gradient checkpointing, the site trainer's precision here,
augmentation, hence no training cache) are read from the code; that configuration is measured too, and its time
per epoch, round and run derived for `--train-subjects` training subjects a site. Training only: validation, data
loading and augmentation, and NVFlare's overhead are not included (inference per subject is reported apart).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.gpu import RANDOM_WEIGHTS_NOTE, build, make_batch, peak_rss_mib, timed_steps

PRESET = "base"
BATCH_SIZES = (1, 2)
PRECISIONS = ("fp32", "bf16")
TRAIN_SUBJECTS = 40


def measure_one(
    batch_size: int, cache: bool, precision: str, grad_ckpt: bool, warmup: int, steps: int
) -> dict[str, Any]:
    """Step seconds, peak RSS and (fp32, uncached) inference seconds of one configuration, in a fresh process."""
    device = torch.device("cpu")
    module, optimizer = build(PRESET, cache, grad_ckpt, device)
    rss_after_build = psutil.Process().memory_info().rss / 2**20
    batch = make_batch(module, batch_size, device)
    load_before = os.getloadavg()[0]
    warm = timed_steps(module, optimizer, batch, precision, 0, warmup)
    cpu_start = time.process_time()
    seconds = timed_steps(module, optimizer, batch, precision, 0, steps)
    cpu_per_step = (time.process_time() - cpu_start) / steps
    result: dict[str, Any] = {
        "batch_size": batch_size,
        "prefix_cache": cache,
        "precision": precision,
        "grad_ckpt": grad_ckpt,
        "step_s": round(statistics.median(seconds), 2),
        "step_s_min": round(min(seconds), 2),
        "step_s_each": [round(s, 2) for s in seconds],
        "warmup_step_s": [round(s, 2) for s in warm],
        "cpu_s_per_step": round(cpu_per_step, 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rss_after_build_mib": round(rss_after_build, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if cache:
        result.update(cache_hits=module.prefix_cache.hits, cache_misses=module.prefix_cache.misses)
    if not cache and precision == "fp32" and batch_size == 1:
        module.eval()
        with torch.no_grad():
            start = time.perf_counter()
            module(batch["image"])
            result["inference_s_per_subject"] = round(time.perf_counter() - start, 2)
    return result


def measure_in_subprocess(
    batch_size: int, cache: bool, precision: str, grad_ckpt: bool, warmup: int, steps: int
) -> dict[str, Any]:
    """`measure_one` in a fresh interpreter, so that each peak RSS is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", str(batch_size), str(int(cache)), precision]
    command += [str(int(grad_ckpt)), "--warmup", str(warmup), "--steps", str(steps)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def real_settings(train_subjects: int) -> dict[str, Any]:
    """The real configuration's training settings at a site on this machine, read from jobs.recipe.real_config."""
    from jobs.recipe import real_config  # here: a measuring subprocess never imports NVFlare

    config = real_config()
    site = config.site
    precision = site.trainer_precision()
    return {
        "rounds": config.rounds,
        "local_epochs": site.local_epochs,
        "batch_size": site.batch_size,
        "lightning_precision_here": precision,
        "augment": site.augment,
        # augmented inputs never hit the prefix cache, and a site never sets cache_train_prefix
        "train_prefix_cache": False,
        "grad_ckpt": site.grad_ckpt,
        "threads": "torch default" if site.threads == 0 else site.threads,
        "process_per_round": config.process_per_round,
        "train_subjects": train_subjects,
    }


def real_job_cost(settings: dict[str, Any], results: list[dict[str, Any]], warmup: int, steps: int) -> dict[str, Any]:
    """The real job's step measured here (reused from `results` when measured already), and per epoch, round, run."""
    precision = "bf16" if settings["lightning_precision_here"].startswith("bf16") else "fp32"
    key = (settings["batch_size"], False, precision, settings["grad_ckpt"])
    rows = [r for r in results if (r["batch_size"], r["prefix_cache"], r["precision"], r["grad_ckpt"]) == key]
    step = rows[0] if rows else measure_in_subprocess(*key, warmup, steps)
    steps_per_epoch = math.ceil(settings["train_subjects"] / settings["batch_size"])
    epoch_s = steps_per_epoch * step["step_s"]
    return {
        **settings,
        "step": step,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": round(epoch_s, 1),
        "epoch_s_at_min_step": round(steps_per_epoch * step["step_s_min"], 1),
        "round_training_s": round(epoch_s * settings["local_epochs"], 1),
        "run_training_h": round(epoch_s * settings["local_epochs"] * settings["rounds"] / 3600, 2),
    }


def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), help="batch sizes")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), help="fp32, bf16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the cached variant's miss)")
    parser.add_argument("--train-subjects", type=int, default=TRAIN_SUBJECTS, help="training subjects of a site")
    parser.add_argument("--one", nargs=4, metavar=("BATCH", "CACHE", "PRECISION", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        batch_size, cache, precision, grad_ckpt = args.one
        result = measure_one(
            int(batch_size), bool(int(cache)), precision, bool(int(grad_ckpt)), args.warmup, args.steps
        )
        print(json.dumps(result))
        return
    started = time.perf_counter()
    settings = real_settings(args.train_subjects)
    results = [
        measure_in_subprocess(batch_size, cache, precision, False, args.warmup, args.steps)
        for precision in args.precisions
        for cache in (False, True)
        for batch_size in args.batch_sizes
    ]
    document = {
        "bench": "CPU cost of CineMA-base dual-LoRA training steps",
        "cpu_model": cpu_model(),
        "logical_cpus": psutil.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": PRESET,
        "weights": RANDOM_WEIGHTS_NOTE,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "results": results,
        "real_job": real_job_cost(settings, results, args.warmup, args.steps),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(document))


if __name__ == "__main__":
    main()
