"""Server aggregator: every update is validated against the round's global model before it counts, then the
sample-weighted mean of the shared keys (optionally with each site's update clipped) becomes the next global model."""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants

from custom.site_state import state_digest
from models.policy import SharingPolicy
from models.protocol import AUDIT_FILE, DP_EPSILON_KEY, SAMPLES_KEY

DEFAULT_MAX_SAMPLES_PER_SITE = 100_000
"""The largest training-sample count a site may claim (a job setting): a count above it is rejected, not clipped."""


@dataclass
class AcceptedUpdate:
    """An accepted update: its weight, its parameters cast to the global model's dtypes, and its metrics."""

    samples: int
    params: dict[str, Any]
    metrics: dict[str, Any]
    dp_epsilon: float | None = None


class SharedKeyAggregator(ModelAggregator):
    """Weighted mean, per key, of the shared parameters the sites send; weights are their training-sample counts.

    Before an update counts it is checked against the global model of the round (`expect`, called by the
    controller as it sends the round's task): exactly the policy's shared keys, the global model's shapes, floating
    values (cast to the global model's dtypes, never inherited from whoever arrives first), every value finite,
    `params_type` FULL, one update per site and round, for the current round, and a training-sample count that is
    an integer in [1, `max_samples_per_site`]. A rejected update is left out, logged as an error naming the site and
    the reason, and recorded in `received_keys.jsonl` (every received key list is, so an audit can check what reached
    the server). A round with fewer than `min_updates` valid updates fails.

    `clip_update_norm` (optional, robust aggregation): each site's update (its parameters minus the global model)
    is scaled down to this L2 norm when it is longer, so that no single site can move the global model further.

    Metrics (the sites' pre-training validation of their personalised models) are averaged with the same weights.

    What a shared value is, and how the values are combined, are the overridable `_checked_value`,
    `_weighted_means`, `_describe` and `_result_meta` (custom.secure_aggregation: CKKS ciphertexts).
    """

    def __init__(
        self,
        policy: dict[str, Any],
        min_updates: int = 1,
        max_samples_per_site: int = DEFAULT_MAX_SAMPLES_PER_SITE,
        clip_update_norm: float | None = None,
    ):
        """`policy`: the run's serialised SharingPolicy (`to_dict`), as the job config holds it."""
        super().__init__()
        # Kept as given: NVFlare writes the job config from the constructor's arguments.
        self.policy = policy
        self.min_updates = min_updates
        self.max_samples_per_site = max_samples_per_site
        self.clip_update_norm = clip_update_norm
        self._sharing = SharingPolicy.from_dict(policy, source="SharedKeyAggregator")
        if min_updates < 1 or max_samples_per_site < 1:
            raise ValueError("SharedKeyAggregator: min_updates and max_samples_per_site must be at least 1")
        if clip_update_norm is not None and not (math.isfinite(clip_update_norm) and clip_update_norm > 0):
            raise ValueError(f"SharedKeyAggregator: clip_update_norm must be positive, got {clip_update_norm}")
        self._lock = threading.Lock()  # results of different sites arrive on different threads
        self._reference: dict[str, torch.Tensor] | None = None
        self._reference_is_numpy = False
        self._expected_round: int | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self._accepted: dict[str, AcceptedUpdate] = {}
        self._rejected: dict[str, str] = {}

    def expect(self, global_params: dict[str, Any], current_round: int | None) -> None:
        """The global model the sites receive this round: what their updates are checked against."""
        with self._lock:
            outside = sorted(key for key in global_params if not self._sharing.is_shared(key))
            if outside:
                message = f"the global model holds keys policy {self._sharing.name} does not share: {outside[:3]}"
                raise ValueError(message)
            self._reference_is_numpy = any(isinstance(value, np.ndarray) for value in global_params.values())
            self._reference = {key: torch.as_tensor(value).detach().clone() for key, value in global_params.items()}
            self._expected_round = current_round

    def accept_model(self, model: FLModel) -> bool:
        with self._lock:
            return self._accept(model)

    def _accept(self, model: FLModel) -> bool:
        meta = model.meta or {}
        site = str(meta.get("client_name", "unknown"))
        params = model.params or {}
        outside = sorted(key for key in params if not self._sharing.is_shared(key))
        update, reason = self._validated(site, model, params, outside, meta.get(SAMPLES_KEY))
        self._audit(site, model, outside, reason)
        if update is None:
            self._rejected[site] = reason
            self.error(f"round {self._round()}: rejected the contribution of {site}: {reason}")
            return False
        self._accepted[site] = update
        return True

    def _validated(
        self, site: str, model: FLModel, params: dict[str, Any], outside: list[str], samples: Any
    ) -> tuple[AcceptedUpdate | None, str]:
        """The update cast to the global model's dtypes, or None and why it is refused."""
        if self._reference is None:
            return None, "the aggregator has no global model for this round to check against"
        if site in self._accepted or site in self._rejected:
            return None, "a second update from this site in the same round"
        if model.current_round is not None and self._expected_round is not None:
            if model.current_round != self._expected_round:
                return None, f"an update for round {model.current_round}, the round is {self._expected_round}"
        if outside:
            policy = self._sharing.name
            return None, f"{len(outside)} key(s) outside the shared set of policy {policy}, e.g. {outside[:3]}"
        missing = sorted(set(self._reference) - set(params))
        if missing:
            return None, f"{len(missing)} shared key(s) missing, e.g. {missing[:3]}"
        if model.params_type != ParamsType.FULL:
            return None, f"params type {model.params_type}, the job exchanges {ParamsType.FULL}"
        count_problem = self._sample_count_problem(samples)
        if count_problem:
            return None, count_problem
        epsilon = (model.meta or {}).get(DP_EPSILON_KEY)
        is_number = isinstance(epsilon, int | float) and not isinstance(epsilon, bool)
        if epsilon is not None and not (is_number and math.isfinite(epsilon) and epsilon >= 0):
            return None, f"meta[{DP_EPSILON_KEY!r}] must be a finite non-negative number, got {epsilon!r}"
        checked = {}
        for key, expected in self._reference.items():
            value, problem = self._checked_value(key, params[key], expected)
            if problem:
                return None, problem
            checked[key] = value
        return AcceptedUpdate(
            int(samples), checked, dict(model.metrics or {}), None if epsilon is None else float(epsilon)
        ), ""

    def _checked_value(self, key: str, value: Any, expected: torch.Tensor) -> tuple[Any, str]:
        """One shared value as it will be averaged (cast to the global model's dtype) and "", or None and why it is
        refused."""
        tensor, problem = _as_float_tensor(value)
        if problem:
            return None, f"{key} is {problem}"
        if tuple(tensor.shape) != tuple(expected.shape):
            return None, f"shape of {key} is {tuple(tensor.shape)}, the global model's is {tuple(expected.shape)}"
        if not torch.isfinite(tensor).all():
            return None, f"{key} holds non-finite values"
        return tensor.to(expected.dtype), ""

    def _sample_count_problem(self, samples: Any) -> str:
        is_integer = isinstance(samples, int | np.integer) and not isinstance(samples, bool)
        if not is_integer or not 1 <= int(samples) <= self.max_samples_per_site:
            return f"meta[{SAMPLES_KEY!r}] must be an integer in [1, {self.max_samples_per_site}], got {samples!r}"
        return ""

    def aggregate_model(self) -> FLModel:
        with self._lock:
            return self._aggregate()

    def _aggregate(self) -> FLModel:
        """Weighted means summed in site-name order, so the result does not depend on the order of arrival."""
        current_round = self._round()
        missing = sorted(set(self._all_sites()) - set(self._accepted) - set(self._rejected))
        if missing:
            self.warning(f"round {current_round}: no result from {', '.join(missing)}")
        if self._sharing.shared_parts and len(self._accepted) < self.min_updates:
            raise RuntimeError(
                f"round {current_round}: no acceptable contribution from enough sites: {len(self._accepted)} valid, "
                f"{self.min_updates} needed (rejected: {self._rejected or 'none'}; missing: {missing or 'none'})"
            )
        sites = sorted(self._accepted)
        updates = [self._clipped(self._accepted[site]) for site in sites]
        params = self._weighted_means(updates, current_round)
        metric_names = sorted({name for update in updates for name in update.metrics})
        metrics = {name: _metric_mean([(u.samples, u.metrics.get(name)) for u in updates]) for name in metric_names}
        weights = {site: float(self._accepted[site].samples) for site in sites}
        summary = (
            f"aggregated {len(params)} shared keys from {len(weights)} sites, sample weights {weights}, "
            f"global model {self._describe(params)}"
        )
        self.info(f"round {current_round}: {summary}")
        meta = {"contributors": weights, "rejected": dict(self._rejected), "missing": missing, **self._result_meta()}
        epsilons = {
            site: self._accepted[site].dp_epsilon for site in sites if self._accepted[site].dp_epsilon is not None
        }
        if epsilons:
            # Each patient's data is at one site: by parallel composition the global model is (max ε, δ)-DP for any
            # one patient, provided every site ran DP-SGD (docs/privacy.md).
            meta[DP_EPSILON_KEY] = epsilons
            self.info(
                f"round {current_round}: DP-SGD epsilon spent per site {epsilons}; max {max(epsilons.values()):.3f}"
            )
        result = FLModel(
            params=params,
            params_type=ParamsType.FULL,
            metrics={name: value for name, value in metrics.items() if value is not None} or None,
            meta=meta,
        )
        self.reset_stats()
        return result

    def _weighted_means(self, updates: list[AcceptedUpdate], current_round: int | None) -> dict[str, Any]:
        """The sample-weighted mean of each shared key, in the global model's dtype (and numpy if it is)."""
        total = sum(update.samples for update in updates)
        params = {}
        for key, reference in (self._reference or {}).items():
            mean = sum(update.params[key].to(torch.float64) * update.samples for update in updates) / total
            params[key] = mean.to(reference.dtype)
            if not torch.isfinite(params[key]).all():  # cannot happen with finite, bounded inputs: fail closed
                raise RuntimeError(f"round {current_round}: the mean of {key} is not finite; not writing it")
        if self._reference_is_numpy:
            params = {key: value.numpy() for key, value in params.items()}
        return params

    def _describe(self, params: dict[str, Any]) -> str:
        """How the round's log names the new global model: its digest, which the sites log as they receive it."""
        return state_digest(params)

    def _result_meta(self) -> dict[str, Any]:
        """Metadata the new global model carries to the sites, besides the round's contributors."""
        return {}

    def _clipped(self, update: AcceptedUpdate) -> AcceptedUpdate:
        """The update with its difference from the global model scaled down to `clip_update_norm` when longer."""
        if self.clip_update_norm is None or self._reference is None:
            return update
        deltas = {key: value.double() - self._reference[key].double() for key, value in update.params.items()}
        norm = math.sqrt(sum(float((delta**2).sum()) for delta in deltas.values()))
        if norm <= self.clip_update_norm:
            return update
        scale = self.clip_update_norm / norm
        params = {
            key: (self._reference[key].double() + delta * scale).to(update.params[key].dtype)
            for key, delta in deltas.items()
        }
        return replace(update, params=params)

    def _round(self) -> int | None:
        return self.fl_ctx.get_prop(AppConstants.CURRENT_ROUND) if self.fl_ctx else None

    def _all_sites(self) -> list[str]:
        return [client.name for client in self.fl_ctx.get_engine().get_clients()] if self.fl_ctx else []

    def _audit(self, site: str, model: FLModel, outside: list[str], rejected: str) -> None:
        """One line per received update: its keys, metadata keys and metric names, and why it was rejected."""
        if not self.fl_ctx:
            return
        run_dir = self.fl_ctx.get_engine().get_workspace().get_run_dir(self.fl_ctx.get_job_id())
        record = {
            "round": self._round(),
            "site": site,
            "keys": sorted(model.params or {}),
            "not_shared": outside,
            "meta_keys": sorted(model.meta or {}),
            "metric_keys": sorted(model.metrics or {}),
            "rejected": rejected,
        }
        with open(os.path.join(run_dir, AUDIT_FILE), "a", encoding="utf-8") as audit:
            audit.write(json.dumps(record) + "\n")


def _as_float_tensor(value: Any) -> tuple[torch.Tensor | None, str]:
    """`value` as a floating tensor, or why it is not one (a string, integers, booleans, ragged lists)."""
    if isinstance(value, str | bytes):
        return None, type(value).__name__
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        return None, f"not an array ({error})"
    if not tensor.is_floating_point():
        return None, f"of dtype {tensor.dtype}, not floating point"
    return tensor.detach(), ""


def _metric_mean(pairs: list[tuple[float, Any]]) -> float | None:
    """Weighted mean of the finite numbers among the values; None when there is none."""
    numbers = [(w, float(v)) for w, v in pairs if isinstance(v, int | float) and not isinstance(v, bool)]
    finite = [(w, v) for w, v in numbers if math.isfinite(v)]
    total = sum(w for w, _ in finite)
    return sum(w * v for w, v in finite) / total if total else None
