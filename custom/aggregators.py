"""Server aggregator: sample-weighted mean of the shared keys; a contribution holding any other key is rejected."""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants

from custom.site_state import state_digest
from models.policy import SharingPolicy
from models.protocol import AUDIT_FILE, SAMPLES_KEY


class SharedKeyAggregator(ModelAggregator):
    """Weighted mean, per key, of the shared parameters the sites send; weights are their training-sample counts.

    A second line of defence behind the client filter: a contribution with any key the policy does not share,
    with no positive sample count, or with a shape that disagrees with another site's is rejected whole and
    logged as an error. Every received key list is appended to `received_keys.jsonl` in the server run
    directory, so an audit can check what actually reached the server. Metrics (the sites' pre-training
    validation of their personalised models) are averaged with the same weights. A round in which no site
    contributed fails, naming the rejected and the missing sites.
    """

    def __init__(self, policy: dict[str, Any]):
        """`policy`: the run's serialised SharingPolicy (`to_dict`), as the job config holds it."""
        super().__init__()
        self.policy = policy  # kept as given: NVFlare writes the job config from the constructor's arguments
        self._sharing = SharingPolicy.from_dict(policy, source="SharedKeyAggregator")
        self._lock = threading.Lock()  # results of different sites arrive on different threads
        self.reset_stats()

    def reset_stats(self) -> None:
        self._accepted: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {}
        self._rejected: dict[str, str] = {}
        self._params_type = None

    def accept_model(self, model: FLModel) -> bool:
        with self._lock:
            return self._accept(model)

    def _accept(self, model: FLModel) -> bool:
        meta = model.meta or {}
        site = str(meta.get("client_name", "unknown"))
        params = model.params or {}
        outside = sorted(key for key in params if not self._sharing.is_shared(key))
        self._audit(site, sorted(params), outside)
        reason = self._rejection_reason(params, outside, meta.get(SAMPLES_KEY), model.params_type)
        if reason:
            self._rejected[site] = reason
            self.error(f"round {self._round()}: rejected the contribution of {site}: {reason}")
            return False
        self._accepted[site] = (float(meta[SAMPLES_KEY]), params, model.metrics or {})
        self._params_type = model.params_type
        return True

    def aggregate_model(self) -> FLModel:
        with self._lock:
            return self._aggregate()

    def _aggregate(self) -> FLModel:
        """Weighted means summed in site-name order, so the result does not depend on the order of arrival."""
        current_round = self._round()
        missing = sorted(set(self._all_sites()) - set(self._accepted) - set(self._rejected))
        if missing:
            self.warning(f"round {current_round}: no result from {', '.join(missing)}")
        if not self._accepted and self._sharing.shared_parts:
            raise RuntimeError(
                f"round {current_round}: no acceptable contribution (rejected: {self._rejected or 'none'}; "
                f"missing: {missing or 'none'})"
            )
        contributions = [self._accepted[site] for site in sorted(self._accepted)]
        keys = sorted({key for _, params, _ in contributions for key in params})
        params = {key: _weighted_mean([(w, p[key]) for w, p, _ in contributions if key in p]) for key in keys}
        metric_names = sorted({name for _, _, metrics in contributions for name in metrics})
        metrics = {name: _metric_mean([(w, m.get(name)) for w, _, m in contributions]) for name in metric_names}
        weights = {site: self._accepted[site][0] for site in sorted(self._accepted)}
        summary = (
            f"aggregated {len(params)} shared keys from {len(weights)} sites, sample weights {weights}, "
            f"global model {state_digest(params)}"
        )
        self.info(f"round {current_round}: {summary}")
        result = FLModel(
            params=params,
            params_type=self._params_type,
            metrics={name: value for name, value in metrics.items() if value is not None} or None,
            meta={"contributors": weights, "rejected": dict(self._rejected), "missing": missing},
        )
        self.reset_stats()
        return result

    def _rejection_reason(self, params: dict[str, Any], outside: list[str], samples: Any, params_type: Any) -> str:
        if outside:
            return f"{len(outside)} key(s) outside the shared set of policy {self._sharing.name}, e.g. {outside[:3]}"
        if isinstance(samples, bool) or not isinstance(samples, int | float) or not samples > 0:
            return f"meta[{SAMPLES_KEY!r}] must be a positive number, got {samples!r}"
        if self._params_type is not None and params_type != self._params_type:
            return f"params type {params_type} differs from {self._params_type} sent by the other sites"
        for _, accepted, _ in self._accepted.values():
            for key, value in params.items():
                shape, expected = tuple(np.shape(value)), tuple(np.shape(accepted.get(key, value)))
                if shape != expected:
                    return f"shape of {key} is {shape}, other sites sent {expected}"
        return ""

    def _round(self) -> int | None:
        return self.fl_ctx.get_prop(AppConstants.CURRENT_ROUND) if self.fl_ctx else None

    def _all_sites(self) -> list[str]:
        return [client.name for client in self.fl_ctx.get_engine().get_clients()] if self.fl_ctx else []

    def _audit(self, site: str, keys: list[str], outside: list[str]) -> None:
        if not self.fl_ctx:
            return
        run_dir = self.fl_ctx.get_engine().get_workspace().get_run_dir(self.fl_ctx.get_job_id())
        record = {"round": self._round(), "site": site, "keys": keys, "not_shared": outside}
        with open(os.path.join(run_dir, AUDIT_FILE), "a", encoding="utf-8") as audit:
            audit.write(json.dumps(record) + "\n")


def _weighted_mean(pairs: list[tuple[float, Any]]) -> Any:
    """Weighted mean of same-shape tensors or arrays, accumulated in float64, returned in the input's type."""
    total = sum(weight for weight, _ in pairs)
    accumulated = sum(torch.as_tensor(value).to(torch.float64) * weight for weight, value in pairs)
    first = pairs[0][1]
    mean = (accumulated / total).to(torch.as_tensor(first).dtype)
    return mean.numpy() if isinstance(first, np.ndarray) else mean


def _metric_mean(pairs: list[tuple[float, Any]]) -> float | None:
    """Weighted mean of the finite numbers among the values; None when there is none."""
    numbers = [(w, float(v)) for w, v in pairs if isinstance(v, int | float) and not isinstance(v, bool)]
    finite = [(w, v) for w, v in numbers if math.isfinite(v)]
    total = sum(w for w, _ in finite)
    return sum(w * v for w, v in finite) / total if total else None
