"""Every baseline method's job runs two rounds in a real NVFlare simulator, and its server model holds exactly its
policy's shared keys (med_duallora itself is covered in test_simulator.py)."""

from __future__ import annotations

import pytest
import torch

from jobs.recipe import FederationConfig, export_job, initial_global_state
from models.policy import POLICY_NAMES

pytestmark = pytest.mark.slow

BASELINES = [name for name in POLICY_NAMES if name != "med_duallora"]


@pytest.mark.parametrize("method", BASELINES)
def test_method_job_runs_two_rounds_and_the_server_holds_only_shared_keys(method, simulate_sites, tmp_path):
    config = FederationConfig.for_method(method, rounds=2, local_epochs=1, min_clients=4)
    job_dir = export_job(config, tmp_path / "jobs")
    run = simulate_sites(job_dir, tmp_path)
    assert run.problems() == []

    final = run.global_model()
    policy = config.policy
    assert set(final) == set(initial_global_state(config))
    assert all(policy.is_shared(key) for key in final)
    if method == "local_only":
        assert final == {}, "local_only must not hold any global entry"
        return
    initial = initial_global_state(config)
    assert any(not torch.equal(initial[key], final[key]) for key in final), "the global model never moved"
    if method == "fedsa_lora":
        assert not any(".lora_B." in key for key in final), "FedSA-LoRA must keep B at the sites"
    if method == "ffa_lora":
        assert not any(".lora_A." in key for key in final), "FFA-LoRA's frozen A must not travel"
