"""Compressed transport of weight payloads: every tensor packed into one fp16 or blockwise int8 buffer, and back.

Why not NVFlare's `ModelQuantizer`: its blockwise 8-bit path calls `.cuda()` and fails on a CPU-only site, and every
tensor carries its own 256-entry code table and absmax, so a payload of 16 small adapter tensors misses both targets
(fp16 0.513x and 8-bit 0.330x of the fp32 payload at CineMA-base; docs/privacy.md). Packing the whole update into
one buffer puts the per-payload overhead at about 1 kB.

- `fp16`: every value cast to float16 (relative error below 2^-11; |x| above 65,504 is refused, not clipped).
- `int8`: symmetric absmax quantization in blocks of `blocksize` values that never straddle two tensors. Each block
  keeps its float32 scale absmax/127, so every value comes back within absmax/254 of its block.

The layout (key, shape, dtype of each tensor) travels in the DXO metadata, so a payload decodes without knowing the
model; what the keys and shapes must be is checked after decoding (the aggregator at the server, the downlink check
at a site), as for any update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from custom.filters import WEIGHT_KINDS

CODECS = ("fp16", "int8")
CODEC_META_KEY = "med_duallora_codec"
"""The DXO metadata entry describing a packed payload: codec, block size and layout."""
VALUES_KEY = "packed.values"
SCALES_KEY = "packed.scales"
DEFAULT_BLOCKSIZE = 256
FP16_MAX = float(torch.finfo(torch.float16).max)
INT8_LEVELS = 127
FLOAT_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16)}


class CodecError(ValueError):
    """A payload that cannot be packed, or a packed payload that does not decode; names the field."""


def pack(params: Mapping[str, Any], codec: str, blocksize: int = DEFAULT_BLOCKSIZE) -> tuple[dict, dict[str, Any]]:
    """`params` (name -> floating tensor) as packed DXO data and the metadata entry that decodes it."""
    if codec not in CODECS:
        raise CodecError(f"codec {codec!r}: choose one of {CODECS}")
    if blocksize < 1:
        raise CodecError(f"blocksize {blocksize}: must be at least 1")
    layout = []
    for key, value in params.items():
        if not isinstance(value, torch.Tensor) or str(value.dtype).removeprefix("torch.") not in FLOAT_DTYPES:
            raise CodecError(f"{key}: only float32/float16/bfloat16 tensors are packed, got {type(value).__name__}")
        layout.append([key, list(value.shape), str(value.dtype).removeprefix("torch.")])
    flat = torch.cat([value.detach().reshape(-1).float() for value in params.values()]) if params else torch.zeros(0)
    if not bool(torch.isfinite(flat).all()):
        raise CodecError("a value is not finite: not packing it (the aggregator would reject it anyway)")
    meta = {"codec": codec, "layout": layout}
    if codec == "fp16":
        largest = float(flat.abs().max()) if flat.numel() else 0.0
        if largest > FP16_MAX:
            raise CodecError(f"|value| {largest:.3g} exceeds float16's {FP16_MAX:g}: use int8, or no compression")
        return {VALUES_KEY: flat.half()}, meta
    blocks = _block_ids(layout, blocksize)
    absmax = torch.zeros(int(blocks[-1]) + 1 if blocks.numel() else 0).scatter_reduce(
        0, blocks, flat.abs(), reduce="amax", include_self=True
    )
    scales = torch.where(absmax > 0, absmax / INT8_LEVELS, torch.ones_like(absmax))
    quantized = torch.round(flat / scales[blocks]).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return {VALUES_KEY: quantized, SCALES_KEY: scales}, {**meta, "blocksize": blocksize}


def unpack(data: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors a packed payload (`data`, its metadata entry `meta`) carries; CodecError naming what is wrong."""
    codec = meta.get("codec")
    if codec not in CODECS:
        raise CodecError(f"{CODEC_META_KEY}.codec {codec!r}: not one of {CODECS}")
    layout = _checked_layout(meta.get("layout"))
    extra = sorted(set(data) - {VALUES_KEY, SCALES_KEY})
    if extra:
        raise CodecError(f"packed payload: unexpected entries {extra[:3]} beside {VALUES_KEY}")
    values = data.get(VALUES_KEY)
    expected_dtype = torch.float16 if codec == "fp16" else torch.int8
    total = sum(math.prod(shape) for _, shape, _ in layout)
    if not isinstance(values, torch.Tensor) or values.dtype != expected_dtype or values.shape != (total,):
        found = f"{values.dtype} {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise CodecError(f"{VALUES_KEY}: expected {expected_dtype} of shape ({total},) for the layout, got {found}")
    if codec == "fp16":
        flat = values.float()
    else:
        blocksize = meta.get("blocksize")
        if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
            raise CodecError(f"{CODEC_META_KEY}.blocksize {blocksize!r}: not a positive integer")
        blocks = _block_ids(layout, blocksize)
        scales = data.get(SCALES_KEY)
        n_blocks = int(blocks[-1]) + 1 if blocks.numel() else 0
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.shape != (n_blocks,):
            raise CodecError(f"{SCALES_KEY}: expected float32 of shape ({n_blocks},) for the layout and block size")
        if not bool(torch.isfinite(scales).all()):
            raise CodecError(f"{SCALES_KEY}: a scale is not finite")
        flat = values.float() * scales[blocks]
    params, start = {}, 0
    for key, shape, dtype in layout:
        size = math.prod(shape)
        params[key] = flat[start : start + size].reshape(shape).to(FLOAT_DTYPES[dtype])
        start += size
    return params


def _block_ids(layout: list, blocksize: int) -> torch.Tensor:
    """The block of every value of the flat buffer: each tensor starts a new block, so no block mixes two scales."""
    ids, next_block = [], 0
    for _, shape, _ in layout:
        size = math.prod(shape)
        ids.append(next_block + torch.arange(size) // blocksize)
        next_block += math.ceil(size / blocksize)
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def _checked_layout(layout: Any) -> list[tuple[str, list[int], str]]:
    """The layout entries, each (key, shape, dtype), or CodecError naming the malformed one."""
    if not isinstance(layout, list):
        raise CodecError(f"{CODEC_META_KEY}.layout: expected a list, got {type(layout).__name__}")
    checked, seen = [], set()
    for index, entry in enumerate(layout):
        field = f"{CODEC_META_KEY}.layout[{index}]"
        if not (isinstance(entry, list | tuple) and len(entry) == 3):
            raise CodecError(f"{field}: expected [key, shape, dtype]")
        key, shape, dtype = entry
        if not isinstance(key, str) or key in seen:
            raise CodecError(f"{field}: key {key!r} is not a string, or repeats")
        if not isinstance(shape, list | tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise CodecError(f"{field}: shape {shape!r} is not a list of non-negative integers")
        if dtype not in FLOAT_DTYPES:
            raise CodecError(f"{field}: dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
        seen.add(key)
        checked.append((key, list(shape), dtype))
    return checked


class CompressWeights(DXOFilter):
    """Packs a weight payload (`codec` fp16 or int8) before it is sent; other payloads pass unchanged.

    Add it as the last filter before the wire: after `SharedKeysOnly` on a site's results (which would drop the
    codec's metadata) and before the server's `PayloadMeter("down")`, so that the meter counts what is sent.
    """

    def __init__(self, codec: str = "int8", blocksize: int = DEFAULT_BLOCKSIZE):
        super().__init__(supported_data_kinds=list(WEIGHT_KINDS), data_kinds_to_filter=list(WEIGHT_KINDS))
        pack({}, codec, blocksize)  # refuse a bad codec or block size when the job is built, not in round 0
        self.codec = codec
        self.blocksize = blocksize

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        data, entry = pack(dxo.data or {}, self.codec, self.blocksize)
        return DXO(data_kind=dxo.data_kind, data=data, meta={**dxo.meta, CODEC_META_KEY: entry})


class DecompressWeights(DXOFilter):
    """Unpacks a payload `CompressWeights` packed; an unpacked payload passes unchanged. A malformed one raises
    CodecError, which NVFlare turns into a failed reply from that site (the round goes on without it)."""

    def __init__(self):
        super().__init__(supported_data_kinds=list(WEIGHT_KINDS), data_kinds_to_filter=list(WEIGHT_KINDS))

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        if CODEC_META_KEY not in dxo.meta:
            return dxo
        meta = {key: value for key, value in dxo.meta.items() if key != CODEC_META_KEY}
        entry = dxo.meta[CODEC_META_KEY]
        if not isinstance(entry, dict):
            raise CodecError(f"{CODEC_META_KEY}: expected a dict, got {type(entry).__name__}")
        return DXO(data_kind=dxo.data_kind, data=unpack(dxo.data or {}, entry), meta=meta)
