"""The server's global-model export (custom.global_export): the final global state in the models.export format, for
every policy whose shared parts are a model; a note saying why for the others."""

from __future__ import annotations

import json

import pytest
import torch

from app.site_config import SiteConfig
from custom.global_export import export_global_model
from jobs.recipe import FederationConfig, initial_global_state
from models.export import load_model
from models.protocol import GLOBAL_MODEL_DIR, NO_GLOBAL_MODEL_FILE

POOLED = {"threshold": 0.42, "n_sites": 4, "n_val_healthy": 20, "n_val_diseased": 30}
FIGURES = {
    "ge": {"global_only_auroc": 0.7, "global_only_n": 9, "personalised_auroc": 0.8, "personalised_n": 9},
    "canon": {"global_only_auroc": 0.6, "global_only_n": 8, "personalised_auroc": 0.9, "personalised_n": 8},
}


def _trained_global_state(method: str) -> tuple[SiteConfig, dict[str, torch.Tensor]]:
    """The method's initial global state moved away from its initialisation (so a part left out changes it)."""
    site = SiteConfig.for_method(method)
    generator = torch.Generator().manual_seed(0)
    state = initial_global_state(FederationConfig(site=site))
    return site, {key: value + 0.1 * torch.randn(value.shape, generator=generator) for key, value in state.items()}


@pytest.mark.parametrize(
    ("method", "adapters", "figures_of"),
    [
        ("med_duallora", ["global"], "global_only"),
        ("fedit", ["global"], "personalised"),
        ("ffa_lora", ["global"], "personalised"),
        ("fedavg_full", [], "personalised"),
    ],
)
def test_the_exported_global_model_is_the_final_global_state(tmp_path, method, adapters, figures_of):
    site, state = _trained_global_state(method)
    written = export_global_model(str(tmp_path), site.model_spec(), state, POOLED, FIGURES, 4)
    assert written == str(tmp_path / GLOBAL_MODEL_DIR)
    module = load_model(written)
    metadata = module.export_metadata
    assert (metadata["kind"], metadata["round"], metadata["adapters"]) == ("global", 4, adapters)
    assert metadata["threshold"] == POOLED["threshold"] and metadata["policy"]["name"] == method
    assert metadata["metrics"]["test"]["ge"] == {"auroc": FIGURES["ge"][f"{figures_of}_auroc"], "n": 9}
    assert metadata["input_contract"]["spacing_mm"] == [3.0, 3.0, 10.0]  # the stand-in's config.yaml
    exported = module.shared_state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[key], state[key]) for key in state)


@pytest.mark.parametrize("method", ["ffa_lora", "med_duallora"])
def test_a_replica_exports_the_adapters_its_own_seed_drew(tmp_path, method):
    """A replica of seed s (custom.controller) trained adapters drawn from s; what the sites never send (FFA-LoRA's
    frozen A) exists on the server only as that draw, so the export must make it from s, not from the job's seed."""
    seed = 7
    site, state = _trained_global_state(method)
    replica = SiteConfig.for_method(method, seed=seed)
    site_model = replica.build_module()
    written = export_global_model(str(tmp_path), site.model_spec(), state, POOLED, FIGURES, 4, replica_seed=seed)
    module = load_model(written)
    assert module.export_metadata["replica_seed"] == seed
    exported, drawn = module.model.state_dict(), site_model.model.state_dict()
    sent = {key.removeprefix("model.") for key in state}
    frozen_a = [key for key in exported if "lora_A.global" in key and key not in sent]
    assert bool(frozen_a) == (method == "ffa_lora")
    assert all(torch.equal(exported[key], drawn[key]) for key in frozen_a)


def test_without_a_pooled_threshold_the_default_is_recorded_as_such(tmp_path):
    site, state = _trained_global_state("med_duallora")
    metadata = load_model(export_global_model(str(tmp_path), site.model_spec(), state, None, {}, 0)).export_metadata
    assert metadata["threshold"] == 0.5 and metadata["threshold_source"] == "default 0.5"


@pytest.mark.parametrize("method", ["fedsa_lora", "local_only"])
def test_a_policy_without_a_global_model_gets_a_note_instead(tmp_path, method):
    site, state = _trained_global_state(method)
    written = export_global_model(str(tmp_path), site.model_spec(), state, POOLED, FIGURES, 4)
    assert written == str(tmp_path / NO_GLOBAL_MODEL_FILE)
    assert not (tmp_path / GLOBAL_MODEL_DIR).exists()
    note = (tmp_path / NO_GLOBAL_MODEL_FILE).read_text()
    assert method in note and "personalised_model/" in note


def test_a_global_state_missing_a_shared_key_is_refused(tmp_path):
    site, state = _trained_global_state("med_duallora")
    state.pop(sorted(state)[0])
    with pytest.raises(ValueError, match="missing"):
        export_global_model(str(tmp_path), site.model_spec(), state, POOLED, FIGURES, 4)


def test_the_spec_travels_in_the_job_as_json():
    spec = FederationConfig(site=SiteConfig.for_method("med_duallora")).site.model_spec()
    assert json.loads(json.dumps(spec)) == spec
