"""Secure aggregation at CineMA-base: bytes per round and the time each site and the server add, against plain.

`python bench/secure_aggregation.py` prints one JSON object. Four sites each send med_duallora's shared state at
CineMA-base (16 tensors, 89,092 values; bench.compression.trained_like_update, one seed per site) through the job's
own filters and aggregator (custom.secure_aggregation), with the contexts NVFlare's HEBuilder provisions (CKKS,
N = 8192, coefficient moduli [60, 40, 40], scale 2^40). Bytes are NVFlare's FOBS encoding (custom.comm.payload_bytes,
what the server's meter counts); times are medians over repeats, on one torch thread:
- site: encrypting its update, then decoding and decrypting the new global model;
- server, per round: decoding each site's ciphertexts (each arrives with its context), summing them, encoding the
  result once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import tenseal as ts
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.decomposers import flare_decomposers
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.fuel.utils import fobs
from nvflare.lighter.impl.he import HEBuilder

from bench.compression import trained_like_update
from custom.comm import payload_bytes
from custom.secure_aggregation import DecryptSharedWeights, EncryptedSharedKeyAggregator, EncryptSharedWeights
from models.policy import get_policy
from models.protocol import SAMPLES_KEY

SITES = {"siemens": 40, "philips": 35, "ge": 30, "canon": 25}
"""Each site's training-sample count (the aggregation weight)."""


def provisioned_contexts() -> dict[str, ts.Context]:
    """The site and server contexts NVFlare's HEBuilder writes into the startup kits (its defaults)."""
    builder = HEBuilder()
    builder.initialize(project=None, ctx=None)
    return {
        "client": ts.context_from(builder.get_serialized_context(is_client=True)),
        "server": ts.context_from(builder.get_serialized_context(is_client=False)),
    }


def _timed(action: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """The action's last result and its median wall time in seconds."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


def measure(repeats: int) -> dict[str, Any]:
    flare_decomposers.register()  # as every NVFlare process does before it serializes (custom.comm.payload_bytes)
    contexts = provisioned_contexts()
    updates = {site: trained_like_update(seed) for seed, site in enumerate(SITES)}
    encryptor, decryptor = EncryptSharedWeights(), DecryptSharedWeights()
    encryptor.tenseal_context = decryptor.tenseal_context = contexts["client"]

    def encrypted(site: str) -> bytes:
        fl_ctx, peer = FLContext(), FLContext()
        fl_ctx.set_peer_context(peer)
        dxo = DXO(
            DataKind.WEIGHTS, data={k: v.clone() for k, v in updates[site].items()}, meta={SAMPLES_KEY: SITES[site]}
        )
        return fobs.dumps(encryptor.process(dxo.to_shareable(), fl_ctx))

    wire, encrypt_s = {}, []
    for site in SITES:
        wire[site], seconds = _timed(lambda site=site: encrypted(site), repeats)
        encrypt_s.append(seconds)

    aggregator = EncryptedSharedKeyAggregator(get_policy("med_duallora").to_dict())
    reference = {key: torch.zeros_like(value) for key, value in updates["siemens"].items()}

    def aggregate() -> FLModel:
        aggregator.expect(reference, 0)
        for site in SITES:
            dxo = from_shareable(fobs.loads(wire[site]))
            meta = {**dxo.meta, "client_name": site}
            aggregator.accept_model(FLModel(params=dxo.data, params_type=ParamsType.FULL, meta=meta, current_round=0))
        result = aggregator.aggregate_model()
        return fobs.dumps(DXO(DataKind.WEIGHTS, data=result.params, meta=result.meta).to_shareable())

    downlink, server_s = _timed(aggregate, repeats)

    def decrypt() -> dict[str, torch.Tensor]:
        shareable = decryptor.process(fobs.loads(downlink), FLContext())
        return from_shareable(shareable).data

    decrypted, decrypt_s = _timed(decrypt, repeats)
    total = sum(SITES.values())
    plain_mean = {key: sum(updates[s][key] * n for s, n in SITES.items()) / total for key in reference}
    error = max(float((decrypted[key] - value).abs().max()) for key, value in plain_mean.items())

    plain_up = payload_bytes(DXO(DataKind.WEIGHTS, data=updates["siemens"], meta={SAMPLES_KEY: 40}).to_shareable())
    up = int(statistics.median(len(payload) for payload in wire.values()))
    vectors = from_shareable(fobs.loads(wire["siemens"])).data.values()
    return {
        "params": sum(value.numel() for value in reference.values()),
        "tensors": len(reference),
        "ciphertexts_per_site": sum(-(-vector.size() // (8192 // 2)) for vector in vectors),
        "uplink_bytes_per_site": up,
        "uplink_vs_plain": round(up / plain_up, 1),
        "downlink_bytes_per_site": len(downlink),
        "plain_payload_bytes": plain_up,
        "site_encrypt_s": round(statistics.median(encrypt_s), 3),
        "site_decrypt_s": round(decrypt_s, 3),
        "server_round_s": round(server_s, 3),
        "server_sites": len(SITES),
        "max_abs_error_vs_plain_mean": float(f"{error:.3g}"),
        "context": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps({"update": "med_duallora shared state, CineMA-base", **measure(args.repeats)}))


if __name__ == "__main__":
    main()
