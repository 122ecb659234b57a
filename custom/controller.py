"""FedAvg workflow that trains every connected site each round, completes a round without the ones that fail, and
ends with the two-stage final evaluation of custom.evaluation (pooled threshold, then test) and the export of the
global model (custom.global_export)."""

from __future__ import annotations

import os
from collections.abc import Callable

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg

from custom.evaluation import pooled_threshold, site_histogram
from custom.global_export import export_global_model
from models.atomic_io import write_json_atomic
from models.protocol import CALIBRATE, GLOBAL_THRESHOLD_FILE, GLOBAL_THRESHOLD_KEY, STAGE_KEY, TEST

EVALUATE_TASK = "validate"


class ResilientFedAvg(FedAvg):
    """NVFlare's FedAvg with explicit fault tolerance.

    Every round goes to all connected sites (FedAvg would sample a random `num_clients` subset). The round is
    complete once `min_responses` sites answered and the others either answered too, failed, or stayed silent
    for `straggler_wait_s` seconds; a failing site is logged and left out as long as `min_responses` remains
    reachable, otherwise the run stops. `round_timeout_s` (0 = none) bounds a whole round. `start_round`
    resumes the round count of an earlier run whose persisted global model the persistor loads.

    After the last round the final global model goes to every site twice (`validate`): `calibrate` collects the
    histograms of its validation scores and fixes its pooled threshold (written beside the global model as
    global_threshold.json), `test` sends that threshold and collects the test metrics. The global model is then
    exported beside the server's run folder (`model_spec`, from the job, describes the model; none: no export).
    """

    def __init__(
        self,
        *args,
        min_responses: int = 1,
        straggler_wait_s: int = 3600,
        round_timeout_s: int = 0,
        model_spec: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.model_spec = model_spec
        if min_responses < 1:
            raise ValueError(f"min_responses must be at least 1, got {min_responses}")
        self.min_responses = min_responses
        self.straggler_wait_s = straggler_wait_s
        self.round_timeout_s = round_timeout_s
        self._final_model: FLModel | None = None

    def save_model(self, model: FLModel) -> None:
        """Persist the round's global model and keep it for the final evaluation."""
        self._final_model = model
        super().save_model(model)

    def run(self) -> None:
        super().run()
        if self._final_model is not None and not self.abort_signal.triggered:
            self.final_evaluation(self._final_model)

    def _evaluate(self, model: FLModel, meta: dict) -> list[FLModel]:
        sites = self.sample_clients(None)
        data = FLModel(params=model.params, params_type=ParamsType.FULL, meta=meta)
        return self.broadcast_model(
            task_name=EVALUATE_TASK,
            data=data,
            targets=sites,
            min_responses=min(self.min_responses, len(sites)),
            timeout=self.round_timeout_s,
            wait_time_after_min_received=self.straggler_wait_s,
            blocking=True,
        )

    def final_evaluation(self, model: FLModel) -> None:
        """Calibrate the global model's threshold on the sites' pooled validation histograms, then test it."""
        replies = self._evaluate(model, {STAGE_KEY: CALIBRATE})
        histograms = []
        for reply in replies:
            site = (reply.meta or {}).get("client_name", "?")
            histogram = site_histogram(reply.metrics, site)
            if histogram is not None:
                histograms.append(histogram)
        pooled = pooled_threshold(histograms)
        if pooled is not None:
            write_json_atomic(os.path.join(self.get_app_dir(), GLOBAL_THRESHOLD_FILE), pooled)
            self.info(f"global model's pooled validation threshold: {pooled}")
        threshold = pooled["threshold"] if pooled else None
        test_figures = {}
        for reply in self._evaluate(model, {STAGE_KEY: TEST, GLOBAL_THRESHOLD_KEY: threshold}):
            site = (reply.meta or {}).get("client_name", "?")
            self.info(f"final test metrics of {site}: {reply.metrics}")
            test_figures[site] = dict(reply.metrics or {})
        if self.model_spec is not None:
            run_dir = os.path.dirname(self.get_app_dir())
            written = export_global_model(
                run_dir, self.model_spec, model.params or {}, pooled, test_figures, self.current_round
            )
            self.info(f"global model: {written}")

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
        """Send the round's task; the aggregator first learns the global model the updates must match."""
        if task_name == self.task_name and data is not None and hasattr(self.aggregator, "expect"):
            self.aggregator.expect(data.params or {}, self.current_round)
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
