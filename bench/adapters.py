"""Bench the adapters on the `small` ConvViT (CPU, batch 2): step-time and memory ratios, plus base-size counts.

`python bench/adapters.py` prints one JSON line. Every variant lives in this process; each round runs one training
step of each, in a shuffled order. A step-time ratio is the median over rounds of the within-round ratio (robust to
background load on a shared CPU); the absolute medians and their plain ratios are printed too. Activation memory is
the peak RSS growth during training over the RSS after building the model and optimiser, each variant in a fresh
subprocess so that peaks do not mix.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from models.dual_lora import DualLoRAConfig, backbone_of
from models.lit import DualLoRAClassifier
from models.policy import parameter_counts

PRESET = "small"
BATCH = 2
# name -> (policy, adapted blocks (None = last two), train on cached prefix features)
VARIANTS: dict[str, tuple[str, list[int] | None, bool]] = {
    "dual_two_blocks": ("med_duallora", None, False),
    "single_two_blocks": ("fedit", None, False),
    "single_all_blocks": ("fedit", list(range(12)), False),
    "dual_cached_prefix": ("med_duallora", None, True),
}


def build(variant: str) -> tuple[DualLoRAClassifier, torch.optim.Optimizer]:
    """The LightningModule of a variant (random `small` backbone, seed 0) and its AdamW."""
    policy, blocks, cached = VARIANTS[variant]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning is expected here
        module = DualLoRAClassifier(
            backbone=PRESET, adapter=DualLoRAConfig(blocks=blocks), policy=policy, cache_train_prefix=cached
        )
    module.train()
    return module, module.configure_optimizers()["optimizer"]


def make_batch(module: DualLoRAClassifier) -> dict[str, Any]:
    """A fixed random batch of the backbone's input size (two subjects, one healthy, one diseased)."""
    config = backbone_of(module.model).config
    generator = torch.Generator().manual_seed(1)
    return {
        "image": torch.rand((BATCH, config.input_chans, *config.image_size), generator=generator),
        "label": torch.tensor([0, 1]),
        "subject_id": [f"bench-{i}" for i in range(BATCH)],
    }


def train_step(module: DualLoRAClassifier, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    """One optimiser step exactly as `training_step` runs it; returns its wall time in seconds."""
    start = time.perf_counter()
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(variant: str, steps: int) -> dict[str, float]:
    """Peak RSS growth (MiB) over `steps` training steps over the RSS after building; meant for a fresh process."""
    module, optimizer = build(variant)
    batch = make_batch(module)
    gc.collect()
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark to the current RSS
    for _ in range(steps):
        train_step(module, optimizer, batch)
    peak = _status_kib("VmHWM")
    return {"rss_after_build_mib": baseline / 1024, "peak_growth_mib": (peak - baseline) / 1024}


def memory_in_subprocess(variant: str, steps: int, threads: int) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-of", variant]
    command += ["--memory-steps", str(steps), "--threads", str(threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# step-time ratio name -> (numerator variant, denominator variant)
STEP_RATIOS = {
    "dual_vs_single_step_ratio": ("dual_two_blocks", "single_two_blocks"),
    "two_vs_all_blocks_step_ratio": ("dual_two_blocks", "single_all_blocks"),
    "cached_prefix_vs_all_blocks_step_ratio": ("dual_cached_prefix", "single_all_blocks"),
}


def step_times(rounds: int, warmup: int) -> dict[str, list[float]]:
    """Step seconds per variant; each round runs every variant once, in a shuffled order (fixed seed)."""
    built = {name: build(name) for name in VARIANTS}
    batches = {name: make_batch(module) for name, (module, _) in built.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    shuffler = random.Random(0)
    for round_index in range(warmup + rounds):
        shuffler.shuffle(order)
        for name in order:
            module, optimizer = built[name]
            seconds = train_step(module, optimizer, batches[name])
            if round_index >= warmup:
                times[name].append(seconds)
    cache = built["dual_cached_prefix"][0].prefix_cache
    if cache is None or cache.misses != BATCH:
        raise RuntimeError("the cached-prefix variant did not reuse its prefix features")
    return times


def paired_median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the within-round ratio: load that drifts between rounds cancels out."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def base_counts() -> dict[str, int]:
    """Total / trainable / shared parameters of med_duallora on CineMA-base (2 blocks, r=8, q/kv/proj)."""
    with warnings.catch_warnings(), torch.device("meta"):  # shapes only: no 360 MB of weights to initialise
        warnings.simplefilter("ignore")
        module = DualLoRAClassifier(backbone="base", policy="med_duallora")
    counts = parameter_counts(module, module.policy)
    # CineMA's published 89,494,212 counts its fixed pos_embed as a parameter; here it is a buffer.
    counts["state_dict_values"] = sum(value.numel() for value in module.state_dict().values())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=11, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps per memory measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-counts", action="store_true", help="skip building CineMA-base for the counts")
    parser.add_argument("--memory-of", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.memory_steps)))
        return
    memory = {
        name: memory_in_subprocess(name, args.memory_steps, args.threads)
        for name in ("dual_two_blocks", "single_all_blocks")
    }
    times = step_times(args.rounds, args.warmup)
    result: dict[str, Any] = {"config": PRESET, "batch": BATCH, "threads": args.threads, "rounds": args.rounds}
    result.update({name: paired_median_ratio(times[a], times[b]) for name, (a, b) in STEP_RATIOS.items()})
    result |= {
        "two_vs_all_blocks_act_mem_ratio": memory["dual_two_blocks"]["peak_growth_mib"]
        / memory["single_all_blocks"]["peak_growth_mib"],
        "median_step_s": {name: statistics.median(values) for name, values in times.items()},
        "ratio_of_median_steps": {
            name: statistics.median(times[a]) / statistics.median(times[b]) for name, (a, b) in STEP_RATIOS.items()
        },
        "act_mem_growth_mib": {name: m["peak_growth_mib"] for name, m in memory.items()},
        "rss_after_build_mib": {name: m["rss_after_build_mib"] for name, m in memory.items()},
    }
    if not args.no_counts:
        result["base_med_duallora_params"] = base_counts()
    print(json.dumps(result, sort_keys=False))


if __name__ == "__main__":
    main()
