"""Client result filter: only the shared keys and the declared metadata and metrics leave a site (fail closed)."""

from __future__ import annotations

import math
from typing import Any

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from custom.evaluation import histogram_problem
from models.policy import SharingPolicy
from models.protocol import (
    DP_EPSILON_KEY,
    FULL_MODEL_BYTES_KEY,
    METRIC_NAMES,
    MIN_SUBJECTS_PER_FIGURE,
    SAMPLES_KEY,
    VAL_HISTOGRAM_KEY,
)

WEIGHT_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)
RESULT_META_KEYS = frozenset({SAMPLES_KEY, FULL_MODEL_BYTES_KEY, MetaKey.NUM_STEPS_CURRENT_ROUND, DP_EPSILON_KEY})
"""The only result metadata that leaves a site (each a finite number), besides the declared metrics below."""
METRIC_GROUPS = ("val", "val_global_only", "personalised", "global_only")
"""Each reported figure is `<group>_<name>`, and `<group>_n` counts the subjects it describes."""
METRIC_KEYS = frozenset({f"{group}_{name}" for group in METRIC_GROUPS for name in (*METRIC_NAMES, "n")} | {"val_loss"})


class LeakError(RuntimeError):
    """Raised instead of sending a result that cannot be made safe."""


class SharedKeysOnly(DXOFilter):
    """Everything that leaves a site passes an allowlist; anything not known to be safe is dropped (fail closed).

    - **Parameters**: only the state-dict keys `policy.is_shared` allows (no local adapter, frozen weight or unknown
      key). A weight result that holds keys but not a single shared one raises, so the run fails loudly rather than
      sending an empty update.
    - **Metadata**: only `RESULT_META_KEYS`, each a finite number, and the pre-training validation metrics NVFlare
      carries in the metadata (`initial_metrics`), filtered like every metric.
    - **Metrics**: only `METRIC_KEYS`, each a finite number, and only for a group whose count `<group>_n` is at
      least MIN_SUBJECTS_PER_FIGURE (a figure about fewer people is not sent); plus the final evaluation's
      validation-score histogram in its declared form (custom.evaluation).
    - **A reply that is not OK** leaves with its return code and headers only.

    What was dropped is counted in the site's log. Declare the filter by exact task name (`train`, `validate`):
    NVFlare never applies a filter declared with `["*"]`.
    """

    def __init__(self, policy: dict[str, Any]):
        """`policy`: the run's serialised SharingPolicy (`to_dict`), as the job config holds it."""
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.policy = policy  # kept as given: NVFlare writes the job config from the constructor's arguments
        self._sharing = SharingPolicy.from_dict(policy, source="SharedKeysOnly")

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code() != ReturnCode.OK:
            payload = [key for key in shareable if key != ReservedHeaderKey.HEADERS]
            for key in payload:
                del shareable[key]
            self.log_info(fl_ctx, f"a reply that is not OK leaves without its payload ({len(payload)} fields)")
            return shareable
        try:
            from_shareable(shareable)
        except Exception as error:
            message = f"{self._sharing.name}: a result that is not a DXO cannot be checked; not sending it"
            raise LeakError(message) from error
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        meta, dropped_meta = self.keep_meta(dxo.meta)
        if dxo.data_kind in WEIGHT_KINDS:
            data = self.keep_shared(dxo.data, fl_ctx)
            dropped_data = []
        else:
            data, dropped_data = keep_metrics(dxo.data)
        dropped = sorted(dropped_meta + dropped_data)
        if dropped:
            self.log_info(fl_ctx, f"dropped {len(dropped)} undeclared metadata or metric entries: {dropped}")
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)

    def keep_shared(self, params: dict[str, Any], fl_ctx: FLContext | None = None) -> dict[str, Any]:
        """The shared entries of `params`; raises if `params` holds keys, the policy shares some, but none is there."""
        kept = {key: value for key, value in params.items() if self._sharing.is_shared(key)}
        stripped = len(params) - len(kept)
        # An update already emptied (a local-only job's, by the job's own filter) has nothing left to leak.
        if params and not kept and self._sharing.shared_parts:
            message = f"{self._sharing.name}: none of the {len(params)} keys is shared; not sending an empty update"
            raise LeakError(message)
        if fl_ctx is not None:
            self.log_info(fl_ctx, f"{self._sharing.name}: kept {len(kept)} shared keys, stripped {stripped}")
        return kept

    @staticmethod
    def keep_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The declared metadata entries, and the names of the dropped ones."""
        kept = {key: value for key, value in meta.items() if key in RESULT_META_KEYS and _finite_number(value)}
        if isinstance(meta.get(MetaKey.INITIAL_METRICS), dict):
            kept[MetaKey.INITIAL_METRICS], dropped_metrics = keep_metrics(meta[MetaKey.INITIAL_METRICS])
        else:
            dropped_metrics = []
        dropped = [f"meta.{key}" for key in meta if key not in kept]
        return kept, dropped + [f"meta.{MetaKey.INITIAL_METRICS}.{name}" for name in dropped_metrics]


def keep_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The declared figures about at least MIN_SUBJECTS_PER_FIGURE subjects, and the names of the dropped entries."""
    kept = {}
    for name, value in metrics.items():
        if name == VAL_HISTOGRAM_KEY and not histogram_problem(value):
            kept[name] = value
        elif name in METRIC_KEYS and _finite_number(value) and _enough_subjects(metrics, name):
            kept[name] = value
    return kept, [name for name in metrics if name not in kept]


def _enough_subjects(metrics: dict[str, Any], name: str) -> bool:
    group = next(group for group in sorted(METRIC_GROUPS, key=len, reverse=True) if name.startswith(group + "_"))
    count = metrics.get(f"{group}_n")
    return _finite_number(count) and count >= MIN_SUBJECTS_PER_FIGURE


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
