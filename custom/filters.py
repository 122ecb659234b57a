"""Client result filter: only the keys a sharing policy shares may leave a site (allowlist, fail closed)."""

from __future__ import annotations

from typing import Any

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from custom.evaluation import histogram_problem
from models.policy import SharingPolicy
from models.protocol import VAL_HISTOGRAM_KEY

WEIGHT_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)
_SCALAR_TYPES = (bool, int, float, str, type(None))


class LeakError(RuntimeError):
    """Raised instead of sending a result that cannot be made safe."""


class SharedKeysOnly(DXOFilter):
    """Keeps only the state-dict keys `policy.is_shared` allows; strips local adapters, frozen weights, unknown keys.

    Declare it by exact task name (`train`, plus `validate` / `submit_model` when those tasks run): NVFlare never
    applies a filter declared with `["*"]`. Metrics results keep only plain scalar values and the final
    evaluation's validation-score histogram (custom.evaluation), and any array or tensor found in the metadata is
    dropped, so no weight can ride along outside the parameter dict. A weight
    result that would leave the site without a single shared key raises, so the run fails loudly rather than
    sending an empty update.
    """

    def __init__(self, policy: dict[str, Any]):
        """`policy`: the run's serialised SharingPolicy (`to_dict`), as the job config holds it."""
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.policy = policy  # kept as given: NVFlare writes the job config from the constructor's arguments
        self._sharing = SharingPolicy.from_dict(policy, source="SharedKeysOnly")

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code() != ReturnCode.OK:
            return shareable
        try:
            from_shareable(shareable)
        except Exception as error:
            message = f"{self._sharing.name}: a result that is not a DXO cannot be checked; not sending it"
            raise LeakError(message) from error
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        meta = _without_arrays(dxo.meta)
        if dxo.data_kind in WEIGHT_KINDS:
            data = self.keep_shared(dxo.data, fl_ctx)
        else:
            data = {key: value for key, value in dxo.data.items() if _declared_metric(key, value)}
            if len(data) != len(dxo.data):
                self.log_warning(fl_ctx, f"stripped {len(dxo.data) - len(data)} non-scalar {dxo.data_kind} entries")
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)

    def keep_shared(self, params: dict[str, Any], fl_ctx: FLContext | None = None) -> dict[str, Any]:
        """The shared entries of `params`; raises if the policy shares something but none of it is present."""
        kept = {key: value for key, value in params.items() if self._sharing.is_shared(key)}
        stripped = len(params) - len(kept)
        if not kept and self._sharing.shared_parts:
            message = f"{self._sharing.name}: none of the {len(params)} keys is shared; not sending an empty update"
            raise LeakError(message)
        if fl_ctx is not None:
            self.log_info(fl_ctx, f"{self._sharing.name}: kept {len(kept)} shared keys, stripped {stripped}")
        return kept


def _declared_metric(key: str, value: Any) -> bool:
    """A plain scalar, or the final evaluation's validation-score histogram in its declared form (no subject's
    score or id: counts per class and score bin, of at least MIN_HISTOGRAM_SUBJECTS subjects)."""
    if isinstance(value, _SCALAR_TYPES):
        return True
    return key == VAL_HISTOGRAM_KEY and not histogram_problem(value)


def _without_arrays(value: Any) -> Any:
    """A copy of a metadata tree without tensors or arrays (anything with a shape)."""
    if isinstance(value, dict):
        return {key: _without_arrays(item) for key, item in value.items() if not hasattr(item, "shape")}
    if isinstance(value, list | tuple):
        return [_without_arrays(item) for item in value if not hasattr(item, "shape")]
    return value
