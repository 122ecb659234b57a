"""CineMA-base dual-LoRA training throughput and peak memory on a GPU, per batch size, cache and checkpointing.

`python bench/gpu.py` prints one JSON document. For every combination of the frozen-prefix cache (off: the prefix
runs every step, as in the real job, which augments its inputs; on: the steady state of `cache_train_prefix`, every
subject already cached) and gradient checkpointing of the encoder blocks, and for every batch size, it builds the
`med_duallora` DualLoRAClassifier (random CineMA-base weights: nothing can be downloaded, and speed and memory do
not depend on the weight values), runs warm-up steps, then times steps of the module's own `training_step`,
backward and AdamW step under bf16 autocast. Peak memory is `torch.cuda.max_memory_allocated` of each measurement
(weights, optimiser and cached features included; `allocated_before_mib` is what was held before its steps). An
out-of-memory error is recorded for that measurement, and the larger batch sizes of the same variant are then
skipped. `--device cpu --preset micro --batch-sizes 1 --steps 1` smoke-tests it without a GPU (peak memory is then
the process's peak RSS so far).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from models.dual_lora import DualLoRAConfig, backbone_of
from models.lit import DualLoRAClassifier
from models.policy import parameter_counts

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
PRECISIONS = ("bf16", "fp32")
RANDOM_WEIGHTS_NOTE = (
    "random weights: CineMA's checkpoint cannot be downloaded here; step time and memory do not depend on the values"
)


def build(preset: str, cache: bool, grad_ckpt: bool, device: torch.device) -> tuple[DualLoRAClassifier, Any]:
    """The med_duallora LightningModule on a random `preset` backbone (seed 0), on `device`, with its AdamW."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning is expected here
        module = DualLoRAClassifier(
            backbone=preset, policy="med_duallora", cache_train_prefix=cache, grad_ckpt=grad_ckpt
        )
    module.to(device).train()
    return module, module.configure_optimizers()["optimizer"]


def make_batch(module: DualLoRAClassifier, batch_size: int, device: torch.device) -> dict[str, Any]:
    """A fixed random batch of the backbone's input (labels alternate healthy / diseased, distinct subject ids)."""
    config = backbone_of(module.model).config
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((batch_size, config.input_chans, *config.image_size), generator=generator)
    return {
        "image": images.to(device),
        "label": (torch.arange(batch_size) % 2).to(device),
        "subject_id": [f"bench-{i}" for i in range(batch_size)],
    }


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast on `device`, or no autocast for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(
    module: DualLoRAClassifier, optimizer: torch.optim.Optimizer, batch: dict[str, Any], precision: str
) -> None:
    """One optimiser step as the site runs it: `training_step` (under autocast), backward, AdamW, zero_grad."""
    device = batch["image"].device
    with autocast(device, precision), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    module: DualLoRAClassifier, optimizer: Any, batch: dict[str, Any], precision: str, warmup: int, steps: int
) -> list[float]:
    """Seconds of each of `steps` training steps, after `warmup` untimed ones."""
    device = batch["image"].device
    for _ in range(warmup):
        train_step(module, optimizer, batch, precision)
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(module, optimizer, batch, precision)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    module: DualLoRAClassifier, optimizer: Any, batch_size: int, precision: str, warmup: int, steps: int
) -> dict[str, Any]:
    """Throughput and peak memory of one batch size (the prefix cache emptied first)."""
    device = next(module.parameters()).device
    if module.prefix_cache is not None:
        module.prefix_cache.clear()
        module.prefix_cache.hits = module.prefix_cache.misses = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    batch = make_batch(module, batch_size, device)
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    seconds = timed_steps(module, optimizer, batch, precision, warmup, steps)
    step_s = sum(seconds) / len(seconds)
    result: dict[str, Any] = {
        "batch_size": batch_size,
        "status": "ok",
        "samples_per_s": round(batch_size / step_s, 3),
        "step_s": round(step_s, 4),
        "step_s_each": [round(s, 4) for s in seconds],
    }
    if device.type == "cuda":
        result["allocated_before_mib"] = round(allocated_before / 2**20, 1)
        result["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        result["peak_rss_mib_process"] = round(peak_rss_mib(), 1)
    if module.prefix_cache is not None and module.hparams.cache_train_prefix:
        result.update(cache_hits=module.prefix_cache.hits, cache_misses=module.prefix_cache.misses)
    return result


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or allocator) out-of-memory error."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free(device: torch.device) -> None:
    """Return freed memory to the device between variants."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(
    preset: str,
    cache: bool,
    grad_ckpt: bool,
    batch_sizes: Sequence[int],
    device: torch.device,
    precision: str,
    warmup: int,
    steps: int,
) -> list[dict[str, Any]]:
    """Every batch size of one (cache, grad_ckpt) variant; after an OOM the larger batch sizes are skipped."""
    variant = {"prefix_cache": cache, "grad_ckpt": grad_ckpt}
    module, optimizer = build(preset, cache, grad_ckpt, device)
    rows: list[dict[str, Any]] = []
    oom_at: int | None = None
    for batch_size in sorted(batch_sizes):
        if oom_at is not None:
            rows.append({**variant, "batch_size": batch_size, "status": f"skipped (out of memory at {oom_at})"})
            continue
        try:
            rows.append({**variant, **measure(module, optimizer, batch_size, precision, warmup, steps)})
            continue
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            message = str(error)[:300]
        # outside the except block: its traceback no longer pins the failed step's tensors
        oom_at = batch_size
        rows.append({**variant, "batch_size": batch_size, "status": "out of memory", "error": message})
        optimizer.zero_grad(set_to_none=True)
        free(device)
    del module, optimizer
    free(device)
    return rows


def environment(device: torch.device, preset: str) -> dict[str, Any]:
    """What was measured: device, versions, model dimensions and parameter counts."""
    with warnings.catch_warnings(), torch.device("meta"):  # shapes only
        warnings.simplefilter("ignore")
        module = DualLoRAClassifier(backbone=preset, policy="med_duallora")
    config = backbone_of(module.model).config
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "preset": preset,
        "input": [config.input_chans, *config.image_size],
        "tokens": config.n_patches + 1,
        "policy": "med_duallora",
        "adapter": asdict(DualLoRAConfig()),
        "parameters": parameter_counts(module, module.policy),
        "weights": RANDOM_WEIGHTS_NOTE,
    }
    if device.type == "cuda":
        info["device_memory_mib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**20)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), help="batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (the cached variant's first misses)"
    )
    parser.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    parser.add_argument("--preset", default="base", help="ConvViT preset (micro for a quick CPU smoke run)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="bf16 autocast or plain fp32")
    parser.add_argument("--cache", choices=("both", "on", "off"), default="both", help="frozen-prefix cache variants")
    parser.add_argument("--grad-ckpt", choices=("both", "on", "off"), default="both", help="checkpointing variants")
    parser.add_argument("--out", type=Path, help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        parser.error("--steps must be >= 1, --warmup >= 0 and batch sizes >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    choices = {"both": (False, True), "on": (True,), "off": (False,)}
    started = time.perf_counter()
    results = [
        row
        for cache in choices[args.cache]
        for grad_ckpt in choices[args.grad_ckpt]
        for row in run_variant(
            args.preset, cache, grad_ckpt, args.batch_sizes, device, args.precision, args.warmup, args.steps
        )
    ]
    document = {
        "bench": "dual-LoRA training throughput and peak memory",
        **environment(device, args.preset),
        "precision": "bf16 autocast" if args.precision == "bf16" else "fp32",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "prefix_cache_note": "on = every subject already cached (cache_train_prefix without augmentation); "
        "off = the frozen prefix runs every step, as in the real job (augmented inputs)",
        "results": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(document)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
