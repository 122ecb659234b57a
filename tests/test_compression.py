"""Compressed transport in a real NVFlare simulator run: the meters count the packed bytes both ways, the server
aggregates the decoded updates, and the run trains to completion."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind

from custom.codec import CODEC_META_KEY
from custom.comm import payload_bytes
from jobs.recipe import FederationConfig, export_job, initial_global_state
from jobs.simulate import SimulatorRun
from models.protocol import SITES

pytestmark = pytest.mark.slow

CONFIG = FederationConfig.for_method(rounds=2, local_epochs=1, min_clients=4, name="int8", compression="int8")
TENSOR_BOUND = 0.27
"""int8 values are a quarter of fp32's; the block scales add 4 bytes per block of 256 (or fewer, at a tensor's end)."""
PAYLOAD_BOUND = 0.33
"""The layout and the round's metadata (about 1.5 kB with the uplink's validation figures) come on top: a third of
this small model's payload, under 1 % of CineMA-base's (tests/test_codec.py checks the targets there)."""


@pytest.fixture(scope="module")
def compressed_run(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> SimulatorRun:
    root = tmp_path_factory.mktemp("compressed")
    return simulate_sites(export_job(CONFIG, root / "jobs"), root)


def test_the_compressed_run_completes_and_trains(compressed_run: SimulatorRun):
    assert compressed_run.problems() == []
    final, initial = compressed_run.global_model(), initial_global_state(CONFIG)
    assert sorted(final) == sorted(initial)
    assert all(bool(torch.isfinite(value).all()) for value in final.values())
    assert any(not torch.equal(final[key], initial[key]) for key in initial)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_the_meter_counts_the_packed_bytes(compressed_run: SimulatorRun, direction: str):
    update = compressed_run.global_model()
    fp32_payload = payload_bytes(DXO(DataKind.WEIGHTS, data=update).to_shareable())
    fp32_tensors = sum(value.nbytes for value in update.values())
    records = compressed_run.comm_records(direction)
    assert {(record["round"], record["site"]) for record in records} == {(r, s) for r in range(2) for s in SITES}
    for record in records:
        assert record["tensor_bytes"] <= TENSOR_BOUND * fp32_tensors, (record, fp32_tensors)
        assert record["payload_bytes"] <= PAYLOAD_BOUND * fp32_payload, (record, fp32_payload)


def test_the_server_aggregates_decoded_updates_of_exactly_the_shared_keys(compressed_run: SimulatorRun):
    shared = sorted(initial_global_state(CONFIG))
    audit = compressed_run.received_keys()
    assert {(record["round"], record["site"]) for record in audit} >= {(r, s) for r in range(2) for s in SITES}
    for record in audit:
        if record["round"] in (0, 1) and record["keys"]:
            assert record["keys"] == shared and not record["rejected"], record
            assert CODEC_META_KEY not in record["meta_keys"], record
