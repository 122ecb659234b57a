"""SharedKeyAggregator: sample-weighted mean of shared keys, rejection of anything else, weighted metrics."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from nvflare.apis.client import Client
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants

from custom.aggregators import SharedKeyAggregator
from models.policy import get_policy
from models.protocol import AUDIT_FILE

GLOBAL_A = "model.base_model.model.encoder.blocks.3.attn.q.lora_A.global.weight"
GLOBAL_B = "model.base_model.model.encoder.blocks.3.attn.q.lora_B.global.weight"
LOCAL_A = "model.base_model.model.encoder.blocks.3.attn.q.lora_A.local.weight"
HEAD = "model.base_model.model.pred_head_dict.cls.weight"
SITES = ("siemens", "philips", "ge", "canon")


class _Engine:
    """The engine calls the aggregator makes, backed by a real NVFlare Workspace and Client objects."""

    def __init__(self, root: str, sites: tuple[str, ...]):
        for folder in ("startup", "local"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        self.workspace = Workspace(root_dir=root, site_name="server")
        self.clients = [Client(name, token=name) for name in sites]

    def get_workspace(self) -> Workspace:
        return self.workspace

    def get_clients(self) -> list[Client]:
        return self.clients

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Log events (warnings, errors) have no listener here."""


@pytest.fixture
def aggregator(tmp_path) -> SharedKeyAggregator:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, _Engine(str(tmp_path), SITES), private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job1", private=False, sticky=True)
    ctx.set_prop(AppConstants.CURRENT_ROUND, 2, private=True, sticky=False)
    (tmp_path / "job1").mkdir()
    agg = SharedKeyAggregator(get_policy("med_duallora").to_dict())
    agg.fl_ctx = ctx
    return agg


def _result(site: str, params: dict, samples, metrics: dict | None = None) -> FLModel:
    meta = {"client_name": site, "num_train_samples": samples}
    return FLModel(params=params, params_type=ParamsType.FULL, metrics=metrics, meta=meta)


def test_sample_weighted_mean(aggregator):
    assert aggregator.accept_model(_result("siemens", {GLOBAL_A: torch.full((2, 3), 1.0), HEAD: torch.ones(2)}, 10))
    assert aggregator.accept_model(_result("philips", {GLOBAL_A: torch.full((2, 3), 4.0), HEAD: torch.zeros(2)}, 30))
    result = aggregator.aggregate_model()
    torch.testing.assert_close(result.params[GLOBAL_A], torch.full((2, 3), (10 * 1.0 + 30 * 4.0) / 40))
    torch.testing.assert_close(result.params[HEAD], torch.full((2,), 0.25))
    assert result.params[GLOBAL_A].dtype == torch.float32
    assert result.params_type == ParamsType.FULL
    assert result.meta["contributors"] == {"siemens": 10.0, "philips": 30.0}


def test_the_mean_does_not_depend_on_the_order_of_arrival(tmp_path, aggregator):
    values = {site: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i, site in enumerate(SITES)}
    means = []
    for order in (SITES, tuple(reversed(SITES))):
        for site in order:
            aggregator.accept_model(_result(site, {GLOBAL_A: values[site]}, 3 + len(site)))
        means.append(aggregator.aggregate_model().params[GLOBAL_A])
    assert torch.equal(means[0], means[1])


def test_numpy_payloads_come_back_as_numpy(aggregator):
    aggregator.accept_model(_result("siemens", {GLOBAL_B: np.ones((3, 2), dtype=np.float32)}, 1))
    aggregator.accept_model(_result("ge", {GLOBAL_B: np.zeros((3, 2), dtype=np.float32)}, 3))
    mean = aggregator.aggregate_model().params[GLOBAL_B]
    assert isinstance(mean, np.ndarray) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, np.full((3, 2), 0.25))


def test_metrics_are_weighted_like_the_parameters(aggregator):
    aggregator.accept_model(_result("siemens", {GLOBAL_A: torch.ones(1)}, 1, {"val_bal_acc": 0.5, "val_auroc": 0.9}))
    aggregator.accept_model(
        _result("philips", {GLOBAL_A: torch.ones(1)}, 3, {"val_bal_acc": 1.0, "val_auroc": float("nan")})
    )
    metrics = aggregator.aggregate_model().metrics
    assert metrics["val_bal_acc"] == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)
    assert metrics["val_auroc"] == pytest.approx(0.9)


def test_a_contribution_with_a_local_key_is_rejected_whole(aggregator, tmp_path, caplog):
    aggregator.accept_model(_result("siemens", {GLOBAL_A: torch.ones(1)}, 5))
    with caplog.at_level(logging.ERROR):
        accepted = aggregator.accept_model(_result("ge", {GLOBAL_A: torch.full((1,), 9.0), LOCAL_A: torch.ones(1)}, 5))
    assert not accepted
    assert "rejected the contribution of ge" in caplog.text and LOCAL_A in caplog.text
    result = aggregator.aggregate_model()
    torch.testing.assert_close(result.params[GLOBAL_A], torch.ones(1))
    assert LOCAL_A not in result.params
    assert "ge" in result.meta["rejected"]
    audit = [json.loads(line) for line in (tmp_path / "job1" / AUDIT_FILE).read_text().splitlines()]
    assert [(r["site"], r["not_shared"]) for r in audit] == [("siemens", []), ("ge", [LOCAL_A])]
    assert audit[1]["round"] == 2


@pytest.mark.parametrize("samples", [None, 0, -3, True, "12"])
def test_a_contribution_without_a_positive_sample_count_is_rejected(aggregator, samples):
    assert not aggregator.accept_model(_result("siemens", {GLOBAL_A: torch.ones(1)}, samples))


def test_a_shape_disagreement_is_rejected(aggregator):
    aggregator.accept_model(_result("siemens", {GLOBAL_A: torch.ones(2, 3)}, 1))
    assert not aggregator.accept_model(_result("philips", {GLOBAL_A: torch.ones(3, 2)}, 1))


def test_missing_sites_are_logged(aggregator, caplog):
    aggregator.accept_model(_result("siemens", {GLOBAL_A: torch.ones(1)}, 1))
    aggregator.accept_model(_result("philips", {GLOBAL_A: torch.ones(1)}, 1))
    with caplog.at_level(logging.WARNING):
        result = aggregator.aggregate_model()
    assert "round 2: no result from canon, ge" in caplog.text
    assert result.meta["missing"] == ["canon", "ge"]


def test_a_round_with_nothing_acceptable_fails(aggregator):
    aggregator.accept_model(_result("siemens", {LOCAL_A: torch.ones(1)}, 1))
    with pytest.raises(RuntimeError, match="no acceptable contribution"):
        aggregator.aggregate_model()


def test_state_resets_between_rounds(aggregator):
    aggregator.accept_model(_result("siemens", {GLOBAL_A: torch.ones(1)}, 1))
    aggregator.aggregate_model()
    aggregator.accept_model(_result("philips", {GLOBAL_A: torch.zeros(1)}, 1))
    result = aggregator.aggregate_model()
    torch.testing.assert_close(result.params[GLOBAL_A], torch.zeros(1))
    assert result.meta["contributors"] == {"philips": 1.0}
