"""bench/gpu.py runs on CPU (`micro` preset) and records an out-of-memory measurement instead of failing."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu

SMOKE = ["--device", "cpu", "--preset", "micro", "--steps", "1", "--warmup", "1"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    gpu.main([*SMOKE, *argv])
    return json.loads(capsys.readouterr().out)


def test_cpu_smoke_run_covers_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    document = run(capsys, "--batch-sizes", "1", "2")
    assert document["device"] == "cpu" and document["precision"] == "bf16 autocast"
    assert document["weights"].startswith("random weights")
    variants = {(r["prefix_cache"], r["grad_ckpt"], r["batch_size"]) for r in document["results"]}
    assert variants == {(c, g, b) for c in (False, True) for g in (False, True) for b in (1, 2)}
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 for r in document["results"])
    cached = [r for r in document["results"] if r["prefix_cache"]]
    assert all(r["cache_misses"] == r["batch_size"] and r["cache_hits"] == r["batch_size"] for r in cached)


def test_out_of_memory_is_recorded_and_larger_batches_skipped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    measure = gpu.measure

    def tight_memory(module, optimizer, batch_size: int, *args):
        if batch_size >= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return measure(module, optimizer, batch_size, *args)

    monkeypatch.setattr(gpu, "measure", tight_memory)
    document = run(
        capsys, "--batch-sizes", "1", "2", "4", "--cache", "off", "--grad-ckpt", "off", "--precision", "fp32"
    )
    assert [r["status"] for r in document["results"]] == ["ok", "out of memory", "skipped (out of memory at 2)"]
    assert "Tried to allocate" in document["results"][1]["error"]
