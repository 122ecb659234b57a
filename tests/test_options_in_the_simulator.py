"""The transport and privacy options in one real NVFlare simulator run (one run for both keeps CI within its
budget; neither option reads the other's output): with compressed transport the meters count the packed bytes both
ways and the server aggregates the decoded updates; with DP-SGD each site's ε composes over the rounds through its
saved state, reaches the budget and no more, and is reported in the logs, the metadata and TensorBoard."""

from __future__ import annotations

import json

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from custom.codec import CODEC_META_KEY
from custom.comm import payload_bytes
from jobs.recipe import FederationConfig, export_job, initial_global_state
from jobs.simulate import SimulatorRun
from models.protocol import DP_EPSILON_KEY, SITES

pytestmark = pytest.mark.slow

EPSILON = 8.0
CONFIG = FederationConfig.for_method(
    rounds=2, local_epochs=1, min_clients=4, name="int8_dp", compression="int8", dp_epsilon=EPSILON
)
TENSOR_BOUND = 0.27
"""int8 values are a quarter of fp32's; the block scales add 4 bytes per block of 256 (or fewer, at a tensor's end)."""
PAYLOAD_BOUND = 0.33
"""The layout and the round's metadata (about 1.5 kB with the uplink's validation figures) come on top: a third of
this small model's payload, under 1 % of CineMA-base's (tests/test_codec.py checks the targets there)."""


@pytest.fixture(scope="module")
def options_run(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> SimulatorRun:
    root = tmp_path_factory.mktemp("options")
    return simulate_sites(export_job(CONFIG, root / "jobs"), root)


def test_the_run_completes_and_trains(options_run: SimulatorRun):
    assert options_run.problems() == []
    final, initial = options_run.global_model(), initial_global_state(CONFIG)
    assert sorted(final) == sorted(initial)
    assert all(bool(torch.isfinite(value).all()) for value in final.values())
    assert any(not torch.equal(final[key], initial[key]) for key in initial)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_the_meter_counts_the_packed_bytes(options_run: SimulatorRun, direction: str):
    update = options_run.global_model()
    fp32_payload = payload_bytes(DXO(DataKind.WEIGHTS, data=update).to_shareable())
    fp32_tensors = sum(value.nbytes for value in update.values())
    records = options_run.comm_records(direction)
    assert {(record["round"], record["site"]) for record in records} == {(r, s) for r in range(2) for s in SITES}
    for record in records:
        assert record["tensor_bytes"] <= TENSOR_BOUND * fp32_tensors, (record, fp32_tensors)
        assert record["payload_bytes"] <= PAYLOAD_BOUND * fp32_payload, (record, fp32_payload)


def test_the_server_aggregates_decoded_updates_of_exactly_the_shared_keys(options_run: SimulatorRun):
    shared = sorted(initial_global_state(CONFIG))
    audit = options_run.received_keys()
    assert {(record["round"], record["site"]) for record in audit} >= {(r, s) for r in range(2) for s in SITES}
    for record in audit:
        if record["round"] in (0, 1) and record["keys"]:
            assert record["keys"] == shared and not record["rejected"], record
            assert CODEC_META_KEY not in record["meta_keys"], record


def test_each_site_spends_its_whole_budget_over_both_rounds_and_says_so(options_run: SimulatorRun):
    for site in SITES:
        privacy = json.loads((options_run.personalised_model_dir(site) / "metadata.json").read_text())["privacy"]
        # Each round the site takes its ledger from its saved state (a new process would have nothing else): only
        # the history saved with round 0 carries round 0's steps into round 1.
        assert EPSILON - 0.1 <= privacy["epsilon"] <= EPSILON, (site, privacy)
        assert privacy["budget"] == {"epsilon": EPSILON, "delta": 1e-5, "max_grad_norm": 1.0, "rounds": 2}
        logged = [line for line in options_run.log(site).splitlines() if "DP-SGD has spent epsilon" in line]
        assert [line.split("round ")[1][0] for line in logged] == ["0", "1"], site
        events = EventAccumulator(str(options_run.server_dir / "tb_events" / site), size_guidance={"scalars": 0})
        events.Reload()
        curve = [event.value for event in events.Scalars(DP_EPSILON_KEY)]
        assert len(curve) == 2 and curve[0] < curve[1] <= EPSILON, (site, curve)


def test_the_server_learns_each_sites_epsilon_and_the_global_models(options_run: SimulatorRun):
    audit = options_run.received_keys()
    assert all(DP_EPSILON_KEY in record["meta_keys"] for record in audit if record["keys"])
    assert "DP-SGD epsilon spent per site" in options_run.log()
