"""Faults: a site dying mid-round, or hanging, does not stop the federation (restart: test_simulator.py)."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
import torch

from jobs.recipe import FederationConfig, export_job
from jobs.simulate import SimulatorRun
from models.protocol import SITES

pytestmark = pytest.mark.slow

DYING_SITE = "ge"


def faulty_client(site: str, hook: str, action: str) -> str:
    """The real site script with a Lightning callback that runs `action` at `hook`, at `site`, in round 1."""
    return f"""
import time

import lightning.pytorch as pl
import nvflare.client as flare
from nvflare.app_opt.lightning.api import FLCallback

import app.client as client


class Fault(pl.Callback):
    def {hook}(self, trainer, pl_module, *args):
        fl_round = next(cb for cb in trainer.callbacks if isinstance(cb, FLCallback)).current_round
        if flare.get_site_name() == {site!r} and fl_round == 1:
            {action}


_make_trainer = client.make_trainer
client.make_trainer = lambda config, root, callbacks: _make_trainer(config, root, [*callbacks, Fault()])
client.main()
"""


# `ge` crashes in the middle of round 1 (after its first training batch).
DYING_CLIENT = faulty_client(
    DYING_SITE,
    "on_train_batch_end",
    f'raise RuntimeError("fault injection: {DYING_SITE} dies in the middle of round 1")',
)


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


HANGING_SITE = "canon"
HANG_SECONDS = 90
ROUND_TIMEOUT_S = 25

# `canon` hangs for 90 s at the start of round 1's training.
HANGING_CLIENT = faulty_client(HANGING_SITE, "on_train_start", f"time.sleep({HANG_SECONDS})")


@pytest.fixture(scope="module")
def run_with_hanging_site(simulate_sites, tmp_path_factory: pytest.TempPathFactory) -> SimulatorRun:
    root = tmp_path_factory.mktemp("hanging")
    script = root / "hanging_client.py"
    script.write_text(HANGING_CLIENT)
    config = FederationConfig.for_method(
        rounds=2, local_epochs=1, min_clients=3, round_timeout_s=ROUND_TIMEOUT_S, straggler_wait_s=3600
    )
    return simulate_sites(export_job(config, root / "jobs", train_script=str(script)), root, root / "state")


def _stamp(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def test_a_hung_site_cannot_stall_a_round_past_its_timeout(run_with_hanging_site):
    """The round ends at its timeout without the hung site (the straggler wait alone would have been an hour)."""
    run = run_with_hanging_site
    log = run.log()
    assert "Finished FedAvg." in log and run.global_model_path.is_file()
    assert re.search(r"round 1: aggregated \d+ shared keys from 3 sites", log)
    assert f"round 1: no result from {HANGING_SITE}" in log
    lines = log.splitlines()
    # Round 1 starts as round 0's aggregate is saved: from one aggregation to the next is round 1's duration.
    previous = _stamp(next(line for line in lines if "round 0: aggregated" in line))
    aggregated = _stamp(next(line for line in lines if "round 1: aggregated" in line))
    assert (aggregated - previous).total_seconds() < HANG_SECONDS
    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in run.global_model().values())
