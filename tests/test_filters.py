"""SharedKeysOnly: only the policy's shared keys leave a site; anything it cannot make safe is refused."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
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


LOCAL_A = "model.base_model.model.encoder.blocks.3.attn.q.lora_A.local.weight"
NVFLARE_ADDS = {"filter_history": ["SharedKeysOnly"]}
"""What NVFlare's DXOFilter appends to the metadata after our filter ran: the names of the filters applied."""


def test_declared_metadata_and_metrics_pass(site_state):
    metrics = {
        "val_bal_acc": 0.75,
        "val_n": 12.0,
        "val_loss": 0.4,
        "val_global_only_auroc": 0.8,
        "val_global_only_n": 12,
    }
    meta = {"num_train_samples": 12, "full_model_bytes": 10, "NUM_STEPS_CURRENT_ROUND": 30}
    dxo = _filtered(SharedKeysOnly(MED_DUALLORA), dict(site_state), metrics=metrics, meta=meta)
    assert dxo.meta == {**meta, "initial_metrics": metrics, **NVFLARE_ADDS}


def _smuggling(site_state) -> dict:
    local_a = next(value for key, value in site_state.items() if ".lora_A.local." in key)
    return {
        "tensor": torch.ones(4),
        "tolist": local_a.tolist(),  # a local adapter rebuilt bit-exact from a list
        "tobytes": local_a.numpy().tobytes(),
        "text": "subject patient001: 0.93",
        "rows": [{"subject_id": "patient001", "label": 1, "p_diseased": 0.93}],
        "nan": float("nan"),
        "flag": True,
    }


@pytest.mark.parametrize("name", ["tensor", "tolist", "tobytes", "text", "rows", "nan", "flag"])
def test_undeclared_metadata_never_leaves(site_state, name):
    smuggled = _smuggling(site_state)[name]
    dxo = _filtered(
        SharedKeysOnly(MED_DUALLORA),
        dict(site_state),
        metrics={"val_bal_acc": 0.75, "val_n": 12, name: smuggled},
        meta={"num_train_samples": 12, name: smuggled, "num_train_samples_copy": smuggled},
    )
    expected = {"num_train_samples": 12, "initial_metrics": {"val_bal_acc": 0.75, "val_n": 12}}
    assert dxo.meta == {**expected, **NVFLARE_ADDS}


@pytest.mark.parametrize(
    ("metrics", "kept"),
    [
        ({"val_bal_acc": 0.7, "val_n": 4}, {}),  # about fewer than 5 subjects: not sent
        ({"val_bal_acc": 0.7}, {}),  # no count: not sent
        ({"val_bal_acc": 0.7, "val_n": 5, "val_global_only_mcc": 0.1}, {"val_bal_acc": 0.7, "val_n": 5}),
        ({"val_loss": 0.3, "val_n": 1}, {}),  # one subject's loss is that subject's -log p
        ({"personalised_auroc": 0.9, "personalised_n": 25, "global_only_auroc": 0.8, "global_only_n": 3},
         {"personalised_auroc": 0.9, "personalised_n": 25}),
        ({"val_siemens_bal_acc": 0.7, "val_n": 30}, {"val_n": 30}),  # per-client copies are not declared
        ({"personalised_auroc": float("inf"), "personalised_n": 25}, {"personalised_n": 25}),
    ],
)  # fmt: skip
def test_metrics_leave_only_declared_and_about_enough_subjects(metrics, kept):
    dxo = DXO(DataKind.METRICS, data=metrics)
    result = from_shareable(SharedKeysOnly(MED_DUALLORA).process(dxo.to_shareable(), FLContext()))
    assert result.data == kept


def test_a_reply_that_is_not_ok_leaves_without_its_payload(site_state):
    reply = DXO(DataKind.WEIGHTS, data={LOCAL_A: torch.ones(2)}, meta={"smuggled": 1}).to_shareable()
    reply.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    result = SharedKeysOnly(MED_DUALLORA).process(reply, FLContext())
    assert result.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert set(result) == {"__headers__"}


def test_a_result_without_any_shared_key_is_refused(site_state):
    local_only = {key: value for key, value in site_state.items() if ".local." in key}
    with pytest.raises(LeakError, match="none of the"):
        _filtered(SharedKeysOnly(MED_DUALLORA), local_only)


def test_a_result_that_is_not_a_dxo_is_refused():
    shareable = Shareable()
    shareable["weights"] = {"model.base_model.model.encoder.blocks.3.attn.q.lora_A.local.weight": torch.ones(2)}
    with pytest.raises(LeakError, match="not a DXO"):
        SharedKeysOnly(MED_DUALLORA).process(shareable, FLContext())


def test_local_only_may_send_nothing(site_state):
    local_state = DualLoRAClassifier(backbone="micro", policy="local_only").state_dict()
    assert _filtered(SharedKeysOnly(get_policy("local_only").to_dict()), dict(local_state)).data == {}


def test_an_update_already_emptied_passes_a_second_filter():
    """A site scope's filter after the job's own: a local-only job's emptied update is not an error."""
    assert _filtered(SharedKeysOnly(MED_DUALLORA), {}).data == {}
