"""FedAvg workflow that trains every connected site each round and completes a round without the ones that fail."""

from __future__ import annotations

from collections.abc import Callable

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg


class ResilientFedAvg(FedAvg):
    """NVFlare's FedAvg with explicit fault tolerance.

    Every round goes to all connected sites (FedAvg would sample a random `num_clients` subset). The round is
    complete once `min_responses` sites answered and the others either answered too, failed, or stayed silent
    for `straggler_wait_s` seconds; a failing site is logged and left out as long as `min_responses` remains
    reachable, otherwise the run stops. `round_timeout_s` (0 = none) bounds a whole round. `start_round`
    resumes the round count of an earlier run whose persisted global model the persistor loads.
    """

    def __init__(
        self,
        *args,
        min_responses: int = 1,
        straggler_wait_s: int = 3600,
        round_timeout_s: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if min_responses < 1:
            raise ValueError(f"min_responses must be at least 1, got {min_responses}")
        self.min_responses = min_responses
        self.straggler_wait_s = straggler_wait_s
        self.round_timeout_s = round_timeout_s

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        sites = super().sample_clients(None)
        if len(sites) < self.min_responses:
            raise RuntimeError(f"only {len(sites)} sites connected ({sites}); a round needs {self.min_responses}")
        return sites

    def send_model(
        self,
        task_name: str = "train",
        data: FLModel | None = None,
        targets: list[str] | None = None,
        min_responses: int | None = None,
        timeout: int = 0,
        callback: Callable[[FLModel], None] | None = None,
    ) -> None:
        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=min_responses or min(self.min_responses, len(targets or [])) or None,
            timeout=timeout or self.round_timeout_s,
            wait_time_after_min_received=self.straggler_wait_s,
            blocking=False,
            callback=callback,
        )
