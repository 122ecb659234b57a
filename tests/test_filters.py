"""SharedKeysOnly: only the policy's shared keys leave a site; anything it cannot make safe is refused."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from custom.filters import LeakError, SharedKeysOnly
from models.lit import DualLoRAClassifier
from models.policy import get_policy


@pytest.fixture(scope="module")
def site_state() -> dict[str, torch.Tensor]:
    """The whole state dict a med_duallora site sends (the Lightning callback sends all of it)."""
    return DualLoRAClassifier(backbone="micro", policy="med_duallora").state_dict()


MED_DUALLORA = get_policy("med_duallora").to_dict()


def _filtered(filter_: SharedKeysOnly, params: dict, metrics: dict | None = None, meta: dict | None = None) -> DXO:
    shareable = FLModelUtils.to_shareable(FLModel(params=params, metrics=metrics, meta=meta or {}))
    return from_shareable(filter_.process(shareable, FLContext()))


def test_only_global_adapter_and_head_leave(site_state):
    kept = _filtered(SharedKeysOnly(MED_DUALLORA), dict(site_state)).data
    assert kept, "the global adapter must be sent"
    assert all(".global." in key or "pred_head_dict" in key for key in kept)
    assert not any(".local." in key for key in kept)
    assert any("pred_head_dict" in key for key in kept)
    expected = {k for k in site_state if ("lora_" in k and ".global." in k) or "pred_head_dict" in k}
    assert set(kept) == expected


def test_local_head_stays_when_not_shared(site_state):
    kept = _filtered(SharedKeysOnly(get_policy("med_duallora", share_head=False).to_dict()), dict(site_state)).data
    assert kept and not any("pred_head_dict" in key for key in kept)


def test_unknown_and_injected_keys_are_stripped(site_state):
    params = dict(site_state)
    params["model.base_model.model.encoder.blocks.3.attn.q.lora_A.backdoor.weight"] = torch.ones(2, 2)
    params["site_statistics"] = torch.ones(3)
    kept = _filtered(SharedKeysOnly(MED_DUALLORA), params).data
    assert "site_statistics" not in kept
    assert not any(".backdoor." in key for key in kept)


def test_fedsa_sends_only_lora_a(site_state):
    fedsa_state = DualLoRAClassifier(backbone="micro", policy="fedsa_lora").state_dict()
    kept = _filtered(SharedKeysOnly(get_policy("fedsa_lora").to_dict()), dict(fedsa_state)).data
    assert kept and all(".lora_A.global." in key for key in kept)


def test_arrays_in_metadata_are_dropped_but_metrics_kept(site_state):
    dxo = _filtered(
        SharedKeysOnly(MED_DUALLORA),
        dict(site_state),
        metrics={"val_bal_acc": 0.75},
        meta={"num_train_samples": 12, "smuggled": torch.ones(4)},
    )
    assert dxo.meta["num_train_samples"] == 12
    assert "smuggled" not in dxo.meta
    assert dxo.meta["initial_metrics"] == {"val_bal_acc": 0.75}


def test_a_result_without_any_shared_key_is_refused(site_state):
    local_only = {key: value for key, value in site_state.items() if ".local." in key}
    with pytest.raises(LeakError, match="none of the"):
        _filtered(SharedKeysOnly(MED_DUALLORA), local_only)


def test_a_result_that_is_not_a_dxo_is_refused():
    shareable = Shareable()
    shareable["weights"] = {"model.base_model.model.encoder.blocks.3.attn.q.lora_A.local.weight": torch.ones(2)}
    with pytest.raises(LeakError, match="not a DXO"):
        SharedKeysOnly(MED_DUALLORA).process(shareable, FLContext())


def test_metrics_results_keep_only_scalars():
    dxo = DXO(DataKind.METRICS, data={"bal_acc": 0.5, "weights": torch.ones(3), "note": "ok"})
    result = from_shareable(SharedKeysOnly(MED_DUALLORA).process(dxo.to_shareable(), FLContext()))
    assert result.data == {"bal_acc": 0.5, "note": "ok"}


def test_error_replies_pass_unchanged():
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert SharedKeysOnly(MED_DUALLORA).process(reply, FLContext()) is reply


def test_local_only_may_send_nothing(site_state):
    local_state = DualLoRAClassifier(backbone="micro", policy="local_only").state_dict()
    assert _filtered(SharedKeysOnly(get_policy("local_only").to_dict()), dict(local_state)).data == {}
