"""Faults: a site dying in the middle of a round does not stop the federation (restart: test_simulator.py)."""

from __future__ import annotations

import re

import pytest

from jobs.recipe import SITES, FederationConfig, export_job
from jobs.simulate import SimulatorRun

pytestmark = pytest.mark.slow

DYING_SITE = "ge"

# The real site script, patched so that `ge` crashes in the middle of round 1 (after its first training batch).
DYING_CLIENT = f"""
import lightning.pytorch as pl
import nvflare.client as flare
from nvflare.app_opt.lightning.api import FLCallback

import app.client as client


class DieMidRound(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fl_round = next(cb for cb in trainer.callbacks if isinstance(cb, FLCallback)).current_round
        if flare.get_site_name() == {DYING_SITE!r} and fl_round == 1:
            raise RuntimeError("fault injection: {DYING_SITE} dies in the middle of round 1")


_make_trainer = client.make_trainer
client.make_trainer = lambda config, root, callbacks: _make_trainer(config, root, [*callbacks, DieMidRound()])
client.main()
"""


@pytest.fixture(scope="module")
def run_with_dying_site(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> SimulatorRun:
    root = tmp_path_factory.mktemp("dying")
    script = root / "dying_client.py"
    script.write_text(DYING_CLIENT)
    config = FederationConfig.for_method(rounds=2, local_epochs=1, min_clients=3)
    return simulate_sites(export_job(config, root / "jobs", train_script=str(script)), root, root / "state")


def test_a_site_dying_mid_round_does_not_stop_the_federation(run_with_dying_site):
    run = run_with_dying_site
    log = run.log()
    assert "Finished FedAvg." in log and run.global_model_path.is_file()
    assert re.search(r"round 1: aggregated \d+ shared keys from 3 sites", log)
    assert f"round 1: no result from {DYING_SITE}" in log
    up = run.comm_records("up")
    assert sorted(r["site"] for r in up if r["round"] == 1) == sorted(set(SITES) - {DYING_SITE})
    assert "fault injection" in run.log(DYING_SITE)
    for site in set(SITES) - {DYING_SITE}:
        assert run.test_metrics_path(site).is_file()
