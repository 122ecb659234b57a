"""SharedKeyAggregator: sample-weighted mean of shared keys, rejection of anything else, weighted metrics."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from custom.aggregators import SharedKeyAggregator
from models.policy import get_policy
from models.protocol import AUDIT_FILE, DP_EPSILON_KEY

GLOBAL_A = "model.base_model.model.encoder.blocks.3.attn.q.lora_A.global.weight"
GLOBAL_B = "model.base_model.model.encoder.blocks.3.attn.q.lora_B.global.weight"
LOCAL_A = "model.base_model.model.encoder.blocks.3.attn.q.lora_A.local.weight"
HEAD = "model.base_model.model.pred_head_dict.cls.weight"
SITES = ("siemens", "philips", "ge", "canon")


REFERENCE = {GLOBAL_A: torch.zeros(2, 3), HEAD: torch.zeros(2)}
"""The round's global model in most tests (what the controller hands the aggregator as it sends the task)."""


def _aggregator(ctx: FLContext, **options) -> SharedKeyAggregator:
    agg = SharedKeyAggregator(get_policy("med_duallora").to_dict(), **options)
    agg.fl_ctx = ctx
    agg.expect(REFERENCE, 2)
    return agg


@pytest.fixture
def aggregator(tmp_path, server_context) -> SharedKeyAggregator:
    return _aggregator(server_context(tmp_path))


def _result(site: str, params: dict, samples, metrics: dict | None = None, **fields) -> FLModel:
    meta = {"client_name": site, "num_train_samples": samples}
    options = {"params_type": ParamsType.FULL, "current_round": 2, **fields}
    return FLModel(params=params, metrics=metrics, meta=meta, **options)


def _honest(value: float = 1.0) -> dict:
    return {GLOBAL_A: torch.full((2, 3), value), HEAD: torch.full((2,), value)}


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
    aggregator.expect({GLOBAL_A: torch.zeros(64)}, 2)
    values = {site: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i, site in enumerate(SITES)}
    means = []
    for order in (SITES, tuple(reversed(SITES))):
        for site in order:
            aggregator.accept_model(_result(site, {GLOBAL_A: values[site]}, 3 + len(site)))
        means.append(aggregator.aggregate_model().params[GLOBAL_A])
    assert torch.equal(means[0], means[1])


def test_numpy_payloads_come_back_as_numpy(aggregator):
    aggregator.expect({GLOBAL_B: np.zeros((3, 2), dtype=np.float32)}, 2)
    aggregator.accept_model(_result("siemens", {GLOBAL_B: np.ones((3, 2), dtype=np.float32)}, 1))
    aggregator.accept_model(_result("ge", {GLOBAL_B: np.zeros((3, 2), dtype=np.float32)}, 3))
    mean = aggregator.aggregate_model().params[GLOBAL_B]
    assert isinstance(mean, np.ndarray) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, np.full((3, 2), 0.25))


def test_metrics_are_weighted_like_the_parameters(aggregator):
    aggregator.accept_model(_result("siemens", _honest(), 1, {"val_bal_acc": 0.5, "val_auroc": 0.9}))
    aggregator.accept_model(_result("philips", _honest(), 3, {"val_bal_acc": 1.0, "val_auroc": float("nan")}))
    metrics = aggregator.aggregate_model().metrics
    assert metrics["val_bal_acc"] == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)
    assert metrics["val_auroc"] == pytest.approx(0.9)


def test_a_contribution_with_a_local_key_is_rejected_whole(aggregator, tmp_path, caplog):
    aggregator.accept_model(_result("siemens", _honest(), 5))
    with caplog.at_level(logging.ERROR):
        accepted = aggregator.accept_model(_result("ge", {**_honest(9.0), LOCAL_A: torch.ones(1)}, 5))
    assert not accepted
    assert "rejected the contribution of ge" in caplog.text and LOCAL_A in caplog.text
    result = aggregator.aggregate_model()
    torch.testing.assert_close(result.params[GLOBAL_A], torch.ones(2, 3))
    assert LOCAL_A not in result.params
    assert "ge" in result.meta["rejected"]
    audit = [json.loads(line) for line in (tmp_path / "job1" / AUDIT_FILE).read_text().splitlines()]
    assert [(r["site"], r["not_shared"]) for r in audit] == [("siemens", []), ("ge", [LOCAL_A])]
    assert audit[0]["rejected"] == "" and "outside the shared set" in audit[1]["rejected"]
    assert audit[1]["round"] == 2


def _nan(value: dict) -> dict:
    value[GLOBAL_A][0, 0] = float("nan")
    return value


def _inf(value: dict) -> dict:
    value[HEAD][1] = float("inf")
    return value


# Each attack, as one site's update (params, sample count, FLModel fields), and the reason it must be refused for.
ATTACKS = [
    pytest.param(_nan(_honest(100.0)), 10**9, {}, "must be an integer in", id="nan-and-1e9-samples"),
    pytest.param(_nan(_honest()), 10, {}, "non-finite", id="one-nan-element"),
    pytest.param(_inf(_honest()), 10, {}, "non-finite", id="one-inf-element"),
    pytest.param(_honest(100.0), 10**9, {}, "must be an integer in", id="claims-1e9-samples"),
    pytest.param(_honest(), float("inf"), {}, "must be an integer in", id="infinite-samples"),
    pytest.param(_honest(), 1e308, {}, "must be an integer in", id="1e308-samples"),
    pytest.param(_honest(), 12.0, {}, "must be an integer in", id="float-samples"),
    pytest.param(_honest(), True, {}, "must be an integer in", id="bool-samples"),
    pytest.param(_honest(), "12", {}, "must be an integer in", id="str-samples"),
    pytest.param(_honest(), None, {}, "must be an integer in", id="no-samples"),
    pytest.param(_honest(), 0, {}, "must be an integer in", id="zero-samples"),
    pytest.param(_honest(), -3, {}, "must be an integer in", id="negative-samples"),
    pytest.param({GLOBAL_A: torch.ones(3, 2), HEAD: torch.ones(2)}, 10, {}, "shape of", id="wrong-shape"),
    pytest.param({GLOBAL_A: torch.ones(2, 3, dtype=torch.int64), HEAD: torch.ones(2)}, 10, {}, "int64", id="int64"),
    pytest.param({GLOBAL_A: torch.ones(2, 3, dtype=torch.bool), HEAD: torch.ones(2)}, 10, {}, "bool", id="bool"),
    pytest.param({GLOBAL_A: "1.0", HEAD: torch.ones(2)}, 10, {}, "is str", id="str-value"),
    pytest.param({GLOBAL_A: [[1.0], [1.0, 2.0]], HEAD: torch.ones(2)}, 10, {}, "not an array", id="ragged-list"),
    pytest.param(_honest(), 10, {"params_type": ParamsType.DIFF}, "params type", id="diff-update"),
    pytest.param({GLOBAL_A: torch.ones(2, 3)}, 10, {}, "missing", id="only-some-keys"),
    pytest.param({**_honest(), LOCAL_A: torch.ones(1)}, 10, {}, "outside the shared set", id="local-key"),
    pytest.param(_honest(), 10, {"current_round": 1}, "for round 1", id="stale-round"),
]


@pytest.mark.parametrize(("params", "samples", "fields", "reason"), ATTACKS)
@pytest.mark.parametrize("attacker_first", [True, False], ids=["attacker-first", "attacker-last"])
def test_an_attacking_update_is_refused_and_the_honest_ones_still_count(
    tmp_path, server_context, params, samples, fields, reason, attacker_first
):
    """Whatever arrives first sets no rule: the honest sites are accepted and the global model is their mean."""
    aggregator = _aggregator(server_context(tmp_path))
    honest = [_result("siemens", _honest(1.0), 10), _result("philips", _honest(3.0), 30)]
    attack = _result("ge", {key: value for key, value in params.items()}, samples, **fields)
    arrivals = [attack, *honest] if attacker_first else [*honest, attack]
    accepted = [aggregator.accept_model(model) for model in arrivals]
    assert accepted == ([False, True, True] if attacker_first else [True, True, False])
    result = aggregator.aggregate_model()
    assert reason in result.meta["rejected"]["ge"]
    torch.testing.assert_close(result.params[GLOBAL_A], torch.full((2, 3), 2.5))
    assert result.params[GLOBAL_A].dtype == torch.float32
    assert all(torch.isfinite(value).all() for value in result.params.values())


def test_a_half_precision_update_is_cast_to_the_global_models_dtype(aggregator):
    # canon sorts first among the contributors: nothing may take the result's dtype from it
    aggregator.accept_model(_result("canon", {k: v.half() for k, v in _honest(1.0).items()}, 1))
    aggregator.accept_model(_result("philips", _honest(3.0), 1))
    result = aggregator.aggregate_model()
    assert result.params[GLOBAL_A].dtype == torch.float32
    torch.testing.assert_close(result.params[GLOBAL_A], torch.full((2, 3), 2.0))


def test_a_second_update_from_a_site_in_one_round_is_refused(aggregator):
    assert aggregator.accept_model(_result("siemens", _honest(1.0), 1))
    assert not aggregator.accept_model(_result("siemens", _honest(5.0), 1))
    result = aggregator.aggregate_model()
    torch.testing.assert_close(result.params[GLOBAL_A], torch.ones(2, 3))
    assert "second update" in result.meta["rejected"]["siemens"]


def test_the_sample_bound_is_a_job_setting(tmp_path, server_context):
    aggregator = _aggregator(server_context(tmp_path), max_samples_per_site=50)
    assert aggregator.accept_model(_result("siemens", _honest(), 50))
    assert not aggregator.accept_model(_result("philips", _honest(), 51))


def test_too_few_valid_updates_fail_the_round(tmp_path, server_context):
    aggregator = _aggregator(server_context(tmp_path), min_updates=2)
    aggregator.accept_model(_result("siemens", _honest(), 1))
    aggregator.accept_model(_result("ge", _nan(_honest()), 1))
    with pytest.raises(RuntimeError, match="1 valid, 2 needed"):
        aggregator.aggregate_model()


def test_without_the_rounds_global_model_nothing_is_accepted(tmp_path):
    aggregator = SharedKeyAggregator(get_policy("med_duallora").to_dict())
    assert not aggregator.accept_model(_result("siemens", _honest(), 1))


def test_update_clipping_bounds_what_one_site_can_move(tmp_path, server_context):
    """Robust option: with each update clipped to norm 1, a site sending 1e6 everywhere moves the mean by at most
    its weight share of 1; without clipping it drags the model to about 3e5."""
    huge = {GLOBAL_A: torch.full((2, 3), 1e6), HEAD: torch.full((2,), 1e6)}
    means = {}
    for clip in (None, 1.0):
        aggregator = _aggregator(server_context(tmp_path / str(clip)), clip_update_norm=clip)
        aggregator.accept_model(_result("siemens", _honest(0.0), 10))
        aggregator.accept_model(_result("philips", _honest(0.0), 10))
        aggregator.accept_model(_result("ge", {k: v.clone() for k, v in huge.items()}, 10))
        means[clip] = aggregator.aggregate_model().params
    assert float(means[None][GLOBAL_A].max()) > 3e5
    moved = torch.cat([value.flatten() for value in means[1.0].values()])
    assert float(moved.norm()) <= 1.0 / 3 + 1e-6


def test_missing_sites_are_logged(aggregator, caplog):
    aggregator.accept_model(_result("siemens", _honest(), 1))
    aggregator.accept_model(_result("philips", _honest(), 1))
    with caplog.at_level(logging.WARNING):
        result = aggregator.aggregate_model()
    assert "round 2: no result from canon, ge" in caplog.text
    assert result.meta["missing"] == ["canon", "ge"]


def test_a_round_with_nothing_acceptable_fails(aggregator):
    aggregator.accept_model(_result("siemens", {LOCAL_A: torch.ones(1)}, 1))
    with pytest.raises(RuntimeError, match="no acceptable contribution from enough sites"):
        aggregator.aggregate_model()


def test_state_resets_between_rounds(aggregator):
    aggregator.accept_model(_result("siemens", _honest(1.0), 1))
    aggregator.aggregate_model()
    aggregator.accept_model(_result("philips", _honest(0.0), 1))
    result = aggregator.aggregate_model()
    torch.testing.assert_close(result.params[GLOBAL_A], torch.zeros(2, 3))
    assert result.meta["contributors"] == {"philips": 1.0}


def _with_epsilon(model: FLModel, epsilon) -> FLModel:
    model.meta[DP_EPSILON_KEY] = epsilon
    return model


def test_each_sites_epsilon_reaches_the_rounds_summary(aggregator):
    aggregator.accept_model(_with_epsilon(_result("siemens", _honest(1.0), 10), 7.5))
    aggregator.accept_model(_with_epsilon(_result("philips", _honest(3.0), 30), 8.0))
    assert aggregator.aggregate_model().meta[DP_EPSILON_KEY] == {"philips": 8.0, "siemens": 7.5}


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), -1.0, "8", True])
def test_a_malformed_epsilon_is_refused(aggregator, epsilon):
    aggregator.accept_model(_result("siemens", _honest(1.0), 10))
    assert not aggregator.accept_model(_with_epsilon(_result("ge", _honest(9.0), 10), epsilon))
