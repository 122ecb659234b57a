"""A site's private state across rounds and restarts: every trainable entry its policy keeps at home."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from models.atomic_io import torch_save_atomic
from models.protocol import STATE_ENV, STATE_FILE_PATTERN

logger = logging.getLogger(__name__)


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 of a state dict (names, dtypes, shapes and bytes, in key order): names a global model in the logs of
    the server that made it and of the sites that trained from it."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = torch.as_tensor(state[key]).detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}:".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def site_state_dir(run_name: str, site: str, root: str | None = None, workspace: str | None = None) -> str:
    """`<root>/<run_name>/<site>`; root = `root`, else `$MED_DUALLORA_STATE`, else `med_duallora_state/` in the
    site's `workspace` (default: the working directory).

    The path names the run (the job name), not the NVFlare job id, so a resumed job finds the state of the
    earlier one.
    """
    base = root or os.environ.get(STATE_ENV) or os.path.join(workspace or os.getcwd(), "med_duallora_state")
    return os.path.join(base, run_name, site)


class SiteState:
    """The private entries (local adapter, and the head when the policy keeps it local), one file per completed
    round, the last KEEP_ROUNDS kept: a crash after a site saved round r, resumed at round r, still finds r - 1.

    Each file also names the run and the digest of the global model the round trained from.
    """

    KEEP_ROUNDS = 3

    def __init__(self, directory: str, run_name: str = ""):
        self.directory = directory
        self.run_name = run_name

    @property
    def path(self) -> str:
        """The folder, as error messages name it."""
        return self.directory

    def round_path(self, completed_round: int) -> str:
        return os.path.join(self.directory, STATE_FILE_PATTERN.format(completed_round))

    def saved_rounds(self) -> list[int]:
        """The completed rounds with a saved state, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        prefix, suffix = STATE_FILE_PATTERN.split("{")[0], STATE_FILE_PATTERN.split("}")[1]
        rounds = []
        for name in os.listdir(self.directory):
            number = name[len(prefix) : -len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
            if number.isdigit():
                rounds.append(int(number))
        return sorted(rounds)

    def latest_round(self) -> int | None:
        """The last completed round with a saved state, None before the first."""
        rounds = self.saved_rounds()
        return rounds[-1] if rounds else None

    def save(
        self,
        private: Mapping[str, torch.Tensor],
        completed_round: int,
        global_digest: str = "",
        privacy: list[tuple[float, float, int]] | None = None,
    ) -> None:
        """Persist the private entries reached at the end of `completed_round` (and, under DP-SGD, the privacy
        ledger's history: ε composes over every round); drop all but the last few."""
        state = {key: value.detach().cpu().clone() for key, value in private.items()}
        record = {"round": completed_round, "run": self.run_name, "global_digest": global_digest, "state": state}
        if privacy is not None:
            record["privacy"] = [list(map(float, entry[:2])) + [int(entry[2])] for entry in privacy]
        torch_save_atomic(self.round_path(completed_round), record)
        for old in self.saved_rounds()[: -self.KEEP_ROUNDS]:
            os.remove(self.round_path(old))

    def load(self, completed_round: int | None = None) -> tuple[dict[str, torch.Tensor], int] | None:
        """The private entries saved at `completed_round` (default: the latest) and that round, or None."""
        record = self._record(completed_round)
        return None if record is None else (dict(record["state"]), int(record["round"]))

    def privacy_history(self, completed_round: int | None = None) -> list[tuple[float, float, int]]:
        """The DP ledger's history saved at `completed_round` (default: the latest); empty without one."""
        record = self._record(completed_round)
        return [] if record is None else [(float(s), float(q), int(n)) for s, q, n in record.get("privacy", [])]

    def _record(self, completed_round: int | None) -> dict[str, Any] | None:
        """The saved file of `completed_round` (default: the latest), checked to be this run's; None if absent."""
        if completed_round is None:
            completed_round = self.latest_round()
        if completed_round is None or completed_round not in self.saved_rounds():
            return None
        path = self.round_path(completed_round)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            saved_round = int(saved["round"])
            saved["state"] = dict(saved["state"])
        except (KeyError, TypeError, ValueError, RuntimeError, OSError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path}: unreadable site state ({str(error).splitlines()[0]})") from error
        if saved_round != completed_round or (self.run_name and saved.get("run") not in ("", self.run_name)):
            raise ValueError(f"{path}: holds round {saved_round} of run {saved.get('run')!r}, not this run's")
        return saved

    def for_round(self, current_round: int | None) -> dict[str, torch.Tensor] | None:
        """The private entries a site resumes from when it receives `current_round` (resume_round), or None."""
        saved_round = self.resume_round(current_round)
        loaded = self.load(saved_round) if saved_round is not None else None
        return loaded[0] if loaded else None

    def resume_round(self, current_round: int | None) -> int | None:
        """The saved round a site resumes from when it receives `current_round`, or None to start afresh.

        Round 0 starts a run afresh (state left by an earlier run of the same name is ignored). Round r loads the
        state of round r - 1, also when later rounds were saved (the server failed after the sites saved them);
        without it, the latest earlier state, with a warning. The final evaluation (`current_round` None) takes the
        latest saved state.
        """
        rounds = self.saved_rounds()
        if current_round == 0:
            if rounds:
                logger.warning("%s: round 0 starts afresh; ignoring the state of rounds %s", self.path, rounds)
            return None
        earlier = [r for r in rounds if current_round is None or r < current_round]
        if not earlier:
            logger.warning("%s: no saved site state; the private entries start from their initialisation", self.path)
            return None
        saved_round = earlier[-1]
        if current_round is not None and saved_round != current_round - 1:
            logger.warning("%s: resuming round %d from state of round %d", self.path, current_round, saved_round)
        else:
            logger.info("%s: resuming from the private state saved at round %d", self.path, saved_round)
        return saved_round
