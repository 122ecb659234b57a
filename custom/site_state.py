"""A site's private state across rounds and restarts: every trainable entry its policy keeps at home."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from models.atomic_io import torch_save_atomic
from models.protocol import STATE_ENV, STATE_FILE

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


def site_state_dir(run_name: str, site: str, root: str | None = None) -> str:
    """`<root>/<run_name>/<site>`; root = `root`, else `$MED_DUALLORA_STATE`, else `med_duallora_state/` in the cwd.

    The path names the run (the job name), not the NVFlare job id, so a resumed job finds the state of the
    earlier one; an NVFlare client runs the script with the site workspace as working directory.
    """
    base = root or os.environ.get(STATE_ENV) or os.path.join(os.getcwd(), "med_duallora_state")
    return os.path.join(base, run_name, site)


class SiteState:
    """The private entries (local adapter, and the head when the policy keeps it local) saved after each round."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)

    def save(self, private: Mapping[str, torch.Tensor], completed_round: int) -> None:
        """Persist the private entries reached at the end of `completed_round`."""
        state = {key: value.detach().cpu().clone() for key, value in private.items()}
        torch_save_atomic(self.path, {"round": completed_round, "state": state})

    def load(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The saved private entries and the round they completed, or None when nothing was saved."""
        if not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            return dict(saved["state"]), int(saved["round"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{self.path}: unreadable site state ({error})") from error

    def for_round(self, current_round: int | None) -> dict[str, torch.Tensor] | None:
        """What a site resumes from when it receives `current_round`, or None to start from the initialisation.

        Round 0 starts a run afresh (a state left by an earlier run of the same name is ignored). A later round
        resumes the latest saved state, with a warning when it is not the round right before. The final
        evaluation (`current_round` None) takes the latest saved state.
        """
        saved = self.load()
        if current_round == 0:
            if saved is not None:
                logger.warning("%s: round 0 starts afresh; ignoring state saved at round %d", self.path, saved[1])
            return None
        if saved is None:
            logger.warning("%s: no saved site state; the private entries start from their initialisation", self.path)
            return None
        state, saved_round = saved
        if current_round is not None and saved_round >= current_round:
            logger.warning(
                "%s: state of round %d is not before round %d; ignored", self.path, saved_round, current_round
            )
            return None
        if current_round is not None and saved_round != current_round - 1:
            logger.warning("%s: resuming round %d from state of round %d", self.path, current_round, saved_round)
        else:
            logger.info("%s: resuming from the private state saved at round %d", self.path, saved_round)
        return state
