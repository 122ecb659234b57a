"""A site's private state: one file per completed round, the last few kept, resumed from the round before."""

from __future__ import annotations

import logging

import pytest
import torch

from app.client import site_run_dir
from custom.site_state import SiteState

KEY = "model.base_model.model.encoder.blocks.3.attn.q.lora_B.local.weight"


def _state(value: float) -> dict[str, torch.Tensor]:
    return {KEY: torch.full((2, 2), value)}


@pytest.fixture
def state(tmp_path) -> SiteState:
    return SiteState(str(tmp_path / "run" / "ge"), run_name="run")


def test_resuming_at_round_r_loads_round_r_minus_1_even_after_later_rounds_were_saved(state):
    """The server fails in round 2 after the sites saved round 2; the operator resumes at round 2."""
    for completed in range(3):
        state.save(_state(float(completed)), completed, global_digest=f"g{completed}")
    assert torch.equal(state.for_round(2)[KEY], _state(1.0)[KEY])
    assert torch.equal(state.for_round(3)[KEY], _state(2.0)[KEY])
    assert torch.equal(state.for_round(None)[KEY], _state(2.0)[KEY])  # the final evaluation: the latest


def test_only_the_last_rounds_are_kept(state):
    for completed in range(6):
        state.save(_state(float(completed)), completed)
    assert state.saved_rounds() == [3, 4, 5]
    assert state.load() is not None and state.load()[1] == 5


def test_round_0_starts_afresh_and_a_gap_is_said(state, caplog):
    state.save(_state(1.0), 0)
    assert state.for_round(0) is None
    with caplog.at_level(logging.WARNING):
        resumed = state.for_round(4)
    assert torch.equal(resumed[KEY], _state(1.0)[KEY]) and "resuming round 4 from state of round 0" in caplog.text


def test_a_state_of_another_run_is_refused(tmp_path):
    SiteState(str(tmp_path / "ge"), run_name="other").save(_state(1.0), 0)
    with pytest.raises(ValueError, match="not this run's"):
        SiteState(str(tmp_path / "ge"), run_name="run").for_round(1)


def test_an_unreadable_state_names_the_file(state):
    state.save(_state(1.0), 0)
    with open(state.round_path(0), "wb") as broken:
        broken.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="private_state_round00000.pt: unreadable site state"):
        state.for_round(1)


@pytest.mark.parametrize("working_dir", ["", "job-1/app_ge", "job-1/app_site"])
def test_the_site_run_folder_is_found_from_either_working_directory(tmp_path, monkeypatch, working_dir):
    """In the site's job process NVFlare starts the script in the site workspace; in a process of its own (a process
    per round, a site-installed job) in the job's app folder. Both give `<workspace>/<job id>`."""
    here = tmp_path / working_dir
    here.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(here)
    assert site_run_dir("job-1") == str(tmp_path / "job-1")


def test_the_privacy_ledger_is_saved_with_its_round_and_resumed_with_it(state):
    for completed in range(3):
        state.save(_state(float(completed)), completed, privacy=[(0.9, 0.1, 10 * (completed + 1))])
    assert state.resume_round(2) == 1
    assert state.privacy_history(1) == [(0.9, 0.1, 20)]  # what round 2 resumes from, not the latest round's 30
    assert state.privacy_history(None) == [(0.9, 0.1, 30)]
    state.save(_state(9.0), 3)  # without DP-SGD: no ledger
    assert state.privacy_history(3) == []
