"""Compressed transport at CineMA-base: payload bytes, error and time of each codec, against NVFlare's quantizer.

`python bench/compression.py` prints one JSON object. The update is med_duallora's shared state at CineMA-base (16
tensors, 89,092 values: the global LoRA of blocks 10-11 and the heads) as a site would send it after training: A as
initialised, B and the heads drawn N(0, 0.01) (a fresh B is all zeros, which any codec carries exactly). The payload
is NVFlare's FOBS encoding with the metadata a site sends (custom.comm.payload_bytes, what the server's meter counts).
Targets (#14): fp16 <= 0.51 x and int8 <= 0.27 x the fp32 payload. NVFlare's `ModelQuantizer` is measured too where
bitsandbytes is installed (its module imports it): its blockwise 8-bit path calls `.cuda()`, so on a CPU it fails.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from app.site_config import SiteConfig
from custom.codec import CODEC_META_KEY, CODECS, pack, unpack
from custom.comm import payload_bytes
from models.protocol import FULL_MODEL_BYTES_KEY, SAMPLES_KEY

TARGETS = {"fp16": 0.51, "int8": 0.27}
META = {SAMPLES_KEY: 40, FULL_MODEL_BYTES_KEY: 361_000_000, "NUM_STEPS_CURRENT_ROUND": 20}
REPEATS = 20


def trained_like_update(seed: int = 0) -> dict[str, torch.Tensor]:
    """med_duallora's shared state at CineMA-base, B and the heads drawn N(0, 0.01)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random backbone: only the shared keys' shapes and A's init matter
        state = SiteConfig.for_method("med_duallora", backbone="base", weights="random").build_module()
    update = state.shared_state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key, value in update.items():
        if ".lora_A." not in key:
            update[key] = torch.randn(value.shape, generator=generator) * 0.01
    return update


def _shareable(data: dict[str, Any], meta: dict[str, Any]) -> Shareable:
    return DXO(DataKind.WEIGHTS, data=data, meta=meta).to_shareable()


def _relative_errors(update: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor]) -> list[float]:
    return [float((decoded[key].float() - value).norm() / value.norm()) for key, value in update.items()]


def _median_ms(action: Any) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return round(1000 * sorted(times)[len(times) // 2], 3)


def measure_codecs(update: dict[str, torch.Tensor]) -> dict[str, Any]:
    plain = payload_bytes(_shareable(update, dict(META)))
    codecs = {}
    for codec in CODECS:
        data, entry = pack(update, codec)
        packed = payload_bytes(_shareable(data, {**META, CODEC_META_KEY: entry}))
        errors = _relative_errors(update, unpack(data, entry))
        codecs[codec] = {
            "payload_bytes": packed,
            "ratio": round(packed / plain, 4),
            "target": TARGETS[codec],
            "meets_target": packed / plain <= TARGETS[codec],
            "max_tensor_rel_l2": float(f"{max(errors):.3g}"),
            "encode_ms": _median_ms(lambda codec=codec: pack(update, codec)),
            "decode_ms": _median_ms(lambda data=data, entry=entry: unpack(data, entry)),
        }
    return {"fp32_payload_bytes": plain, "codecs": codecs}


def measure_nvflare_quantizer(update: dict[str, torch.Tensor], plain: int) -> dict[str, Any]:
    """NVFlare's ModelQuantizer/ModelDequantizer on the same update, or why it could not run."""
    try:
        from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
        from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    except ImportError as error:
        return {"skipped": f"{error} (pip install bitsandbytes to compare)"}
    found: dict[str, Any] = {}
    for quantization in ("float16", "blockwise8"):
        shareable = _shareable({key: value.clone() for key, value in update.items()}, dict(META))
        try:
            quantized = ModelQuantizer(quantization_type=quantization).process(shareable, FLContext())
        except Exception as error:  # blockwise8 asserts that CUDA is there
            found[quantization] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
            continue
        size = payload_bytes(quantized)
        decoded = from_shareable(ModelDequantizer().process(quantized, FLContext())).data
        found[quantization] = {
            "payload_bytes": size,
            "ratio": round(size / plain, 4),
            "max_tensor_rel_l2": float(f"{max(_relative_errors(update, decoded)):.3g}"),
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    update = trained_like_update(args.seed)
    result = {
        "update": "med_duallora shared state, CineMA-base",
        "tensors": len(update),
        "params": sum(value.numel() for value in update.values()),
        "torch_threads": 1,
        **measure_codecs(update),
    }
    result["nvflare_model_quantizer"] = measure_nvflare_quantizer(update, result["fp32_payload_bytes"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
