"""FedAvg workflow that trains every connected site each round, completes a round without the ones that fail, and
ends with the two-stage final evaluation of custom.evaluation (pooled threshold, then test) and the export of the
global model (custom.global_export); a job of several replicas runs all of it once per seed."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_constant import WorkspaceConstants
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg

from custom.evaluation import pooled_threshold, site_histogram
from custom.global_export import ENCRYPTED_GLOBAL_MODEL_NOTE, export_global_model
from models.atomic_io import write_json_atomic, write_text_atomic
from models.protocol import (
    CALIBRATE,
    GLOBAL_THRESHOLD_FILE,
    GLOBAL_THRESHOLD_KEY,
    NO_GLOBAL_MODEL_FILE,
    REPLICA_SEED_KEY,
    SHAPES_KEY,
    STAGE_KEY,
    TEST,
    replica_folder,
)

EVALUATE_TASK = "validate"
REPLICA_STARTED = "replica seed"
"""Starts the server log line of each replica's start (`replica seed 2 (3/3)`), which the simulator runner reads."""
REPLICA_CHECKPOINT = "ckpt/init_global_adapters_seed{}.pt"
"""A replica's initial global model, in the server app's custom/ folder (the job writes one per replica seed)."""
ENCRYPTION_META_KEYS = (MetaKey.PROCESSED_KEYS, MetaKey.PROCESSED_ALGORITHM, SHAPES_KEY)
"""What an encrypted global model (custom.secure_aggregation) carries besides its ciphertexts, to every task."""


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

    `replica_seeds`: the job runs one independent federation per seed, one after another, with the same site
    processes (NVFlare's start-up is paid once): rounds, final evaluation and export, each replica from its own
    initial global model (REPLICA_CHECKPOINT), its tasks marked with REPLICA_SEED_KEY, its outputs in
    `<run>/seed<N>/`.
    """

    def __init__(
        self,
        *args,
        min_responses: int = 1,
        straggler_wait_s: int = 3600,
        round_timeout_s: int = 0,
        model_spec: dict | None = None,
        replica_seeds: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.model_spec = model_spec
        self.replica_seeds = list(replica_seeds or [])
        if len(set(self.replica_seeds)) != len(self.replica_seeds):
            raise ValueError(f"replica_seeds {self.replica_seeds} repeat a seed")
        self.replica_seed: int | None = None
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
        for seed in self.replica_seeds or [None]:
            if self.abort_signal.triggered:
                return
            self.replica_seed = seed
            self._final_model = None
            if seed is not None:
                self.info(f"{REPLICA_STARTED} {seed} ({self.replica_seeds.index(seed) + 1}/{len(self.replica_seeds)})")
                self.model = FLModel(params=self._replica_initial_state(seed))
            super().run()
            if self._final_model is not None and not self.abort_signal.triggered:
                self.final_evaluation(self._final_model)

    def _replica_initial_state(self, seed: int) -> dict:
        path = os.path.join(self.get_app_dir(), WorkspaceConstants.CUSTOM_FOLDER_NAME, REPLICA_CHECKPOINT.format(seed))
        return dict(torch.load(path, map_location="cpu", weights_only=True))

    def _output_dir(self) -> str:
        """Where the final evaluation's files go: the server's run folder, or the replica's folder in it."""
        output = os.path.join(os.path.dirname(self.get_app_dir()), replica_folder(self.replica_seed))
        os.makedirs(output, exist_ok=True)
        return output

    def _with_replica(self, meta: dict | None) -> dict:
        return dict(meta or {}) if self.replica_seed is None else {**(meta or {}), REPLICA_SEED_KEY: self.replica_seed}

    def _evaluate(self, model: FLModel, meta: dict) -> list[FLModel]:
        sites = self.sample_clients(None)
        encryption = {key: value for key, value in (model.meta or {}).items() if key in ENCRYPTION_META_KEYS}
        data = FLModel(
            params=model.params, params_type=ParamsType.FULL, meta=self._with_replica({**meta, **encryption})
        )
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
            folder = self.get_app_dir() if self.replica_seed is None else self._output_dir()
            write_json_atomic(os.path.join(folder, GLOBAL_THRESHOLD_FILE), pooled)
            self.info(f"global model's pooled validation threshold: {pooled}")
        threshold = pooled["threshold"] if pooled else None
        test_figures = {}
        for reply in self._evaluate(model, {STAGE_KEY: TEST, GLOBAL_THRESHOLD_KEY: threshold}):
            site = (reply.meta or {}).get("client_name", "?")
            self.info(f"final test metrics of {site}: {reply.metrics}")
            test_figures[site] = dict(reply.metrics or {})
        if self.model_spec is not None and (model.meta or {}).get(MetaKey.PROCESSED_KEYS):
            written = os.path.join(self._output_dir(), NO_GLOBAL_MODEL_FILE)
            write_text_atomic(written, ENCRYPTED_GLOBAL_MODEL_NOTE)
            self.info(f"global model: encrypted, only the sites can read it ({written})")
        elif self.model_spec is not None:
            written = export_global_model(
                self._output_dir(),
                self.model_spec,
                model.params or {},
                pooled,
                test_figures,
                self.current_round,
                self.replica_seed,
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
        if data is not None:
            data.meta = self._with_replica(data.meta)
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
