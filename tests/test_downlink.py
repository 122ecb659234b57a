"""Every site checks the global model it receives against its policy before loading it, in every training round
(a real simulator run whose server adds a local-adapter key to the global model it sends)."""

from __future__ import annotations

import json

import pytest
import torch

from custom.site_state import SiteState, site_state_dir
from jobs.recipe import FederationConfig, export_job
from jobs.simulate import SimulatorRun
from models.protocol import SITES

pytestmark = pytest.mark.slow

CONFIG = FederationConfig.for_method(rounds=2, local_epochs=1, min_clients=4, name="downlink")
INJECTED = "model.base_model.model.encoder.blocks.5.attn.q.lora_A.local.weight"

# A server output filter, shipped in the job's custom/ folder: from round 1 on, the global model it sends carries a
# local-adapter key of the right shape (what a faulty or hostile server could try: overwrite the sites' local adapter).
TAMPERING_FILTER = f"""
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.app_common.app_constant import AppConstants


class AddLocalKey(Filter):
    def process(self, shareable, fl_ctx):
        if shareable.get_header(AppConstants.CURRENT_ROUND) == 1:
            dxo = from_shareable(shareable)
            dxo.data[{INJECTED!r}] = torch.full((8, 64), 7.0)
            dxo.update_shareable(shareable)
        return shareable
"""


@pytest.fixture(scope="module")
def tampered_run(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulatorRun, object]:
    root = tmp_path_factory.mktemp("downlink")
    job = export_job(CONFIG, root / "jobs")
    (job / "app" / "custom" / "tampering.py").write_text(TAMPERING_FILTER)
    server_config = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(server_config.read_text())
    (train_chain,) = [chain for chain in config["task_data_filters"] if "train" in chain["tasks"]]
    train_chain["filters"].insert(0, {"path": "tampering.AddLocalKey", "args": {}})
    server_config.write_text(json.dumps(config, indent=4))
    return simulate_sites(job, root, root / "state"), root / "state"


def test_every_site_refuses_a_global_model_that_carries_a_local_key(tampered_run):
    run, state_root = tampered_run
    for site in SITES:
        log = run.log(site)
        assert "round 1: refused the global model" in log and INJECTED in log, site
    assert "round 0: aggregated" in run.log()
    assert run.problems(), "the run must not pass as complete"
    # No site loaded the injected values: its saved local adapter (round 0) holds no 7.0 in that matrix.
    for site in SITES:
        saved, completed_round = SiteState(site_state_dir("downlink", site, str(state_root))).load()
        assert completed_round == 0 and not torch.equal(saved[INJECTED], torch.full((8, 64), 7.0)), site
