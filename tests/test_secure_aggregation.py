"""Secure aggregation (custom.secure_aggregation) with real TenSEAL contexts made by NVFlare's HEBuilder: the
encrypted round equals plain aggregation within the encoding error, the server cannot decrypt, malformed updates and
models are refused. The end-to-end run, with contexts from provisioning, is in tests/test_poc.py."""

from __future__ import annotations

import pytest
import tenseal as ts
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from bench.secure_aggregation import provisioned_contexts
from custom.aggregators import SharedKeyAggregator
from custom.secure_aggregation import (
    DecryptionError,
    DecryptSharedWeights,
    EncryptedSharedKeyAggregator,
    EncryptSharedWeights,
)
from jobs.job import main as job_main
from jobs.poc import SECURE_AGGREGATOR, loopback_project, uses_secure_aggregation
from jobs.recipe import FederationConfig, export_job
from models.policy import get_policy
from models.protocol import SAMPLES_KEY, SHAPES_KEY

GLOBAL_A = "model.base_model.model.encoder.blocks.3.attn.q.lora_A.global.weight"
GLOBAL_B = "model.base_model.model.encoder.blocks.3.attn.q.lora_B.global.weight"
HEAD = "model.base_model.model.pred_head_dict.cls.weight"
SITES = ("siemens", "philips", "ge", "canon")
SHAPES = {GLOBAL_A: (8, 64), GLOBAL_B: (192, 8), HEAD: (2, 64)}
SAMPLES = {"siemens": 40, "philips": 35, "ge": 30, "canon": 25}
ENCODING_ERROR = 1e-6
"""Bound on |encrypted mean - plain mean| at HEBuilder's defaults (N = 8192, scale 2^40): measured ~6e-8."""


@pytest.fixture(scope="module")
def contexts() -> dict[str, ts.Context]:
    """The contexts provisioning gives the sites (with the secret key) and the server (without), from HEBuilder."""
    return provisioned_contexts()


def _updates() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return {
        site: {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in SHAPES.items()} for site in SITES
    }


def _encrypted(site: str, update: dict[str, torch.Tensor], context: ts.Context, samples=None) -> FLModel:
    """The site's result after its job filter: NVFlare's encryptor, given the site's context (NVFlare loads it from
    the startup kit at START_RUN, which needs a running site)."""
    encryptor = EncryptSharedWeights()
    encryptor.tenseal_context = context
    fl_ctx, peer = FLContext(), FLContext()
    fl_ctx.set_peer_context(peer)
    meta = {SAMPLES_KEY: SAMPLES[site] if samples is None else samples}
    dxo = DXO(DataKind.WEIGHTS, data={key: value.clone() for key, value in update.items()}, meta=meta)
    encrypted = encryptor.process_dxo(dxo, dxo.to_shareable(), fl_ctx)
    meta = {**encrypted.meta, "client_name": site}
    return FLModel(params=encrypted.data, params_type=ParamsType.FULL, meta=meta, current_round=0)


def _over_the_wire(vector: ts.CKKSVector) -> ts.CKKSVector:
    """What the server holds after NVFlare's CKKSVector decomposer: the vector with the context it was sent with."""
    return ts.ckks_vector_from(ts.context_from(vector.context().serialize()), vector.serialize())


def _aggregator(server_context, tmp_path) -> EncryptedSharedKeyAggregator:
    aggregator = EncryptedSharedKeyAggregator(get_policy("med_duallora").to_dict(), min_updates=2)
    aggregator.fl_ctx = server_context(tmp_path, SITES, current_round=0)
    aggregator.expect({key: torch.zeros(shape) for key, shape in SHAPES.items()}, 0)
    return aggregator


def _decrypted(result: FLModel, context: ts.Context) -> dict[str, torch.Tensor]:
    """The site's task-data filter on the new global model."""
    decryptor = DecryptSharedWeights()
    decryptor.tenseal_context = context
    dxo = DXO(DataKind.WEIGHTS, data=dict(result.params), meta=dict(result.meta))
    decrypted = decryptor.process_dxo(dxo, dxo.to_shareable(), FLContext())
    assert SHAPES_KEY not in decrypted.meta and MetaKey.PROCESSED_KEYS not in decrypted.meta
    return decrypted.data


def test_an_encrypted_round_gives_the_plain_weighted_mean(contexts, server_context, tmp_path):
    updates = _updates()
    aggregator = _aggregator(server_context, tmp_path)
    for site in SITES:
        model = _encrypted(site, updates[site], contexts["client"])
        model.params = {key: _over_the_wire(value) for key, value in model.params.items()}
        assert aggregator.accept_model(model), site
    result = aggregator.aggregate_model()
    assert all(isinstance(value, bytes) for value in result.params.values())
    assert result.meta[SHAPES_KEY] == {key: list(shape) for key, shape in SHAPES.items()}

    plain = SharedKeyAggregator(get_policy("med_duallora").to_dict())
    plain.fl_ctx = server_context(tmp_path / "plain", SITES, current_round=0)
    plain.expect({key: torch.zeros(shape) for key, shape in SHAPES.items()}, 0)
    for site in SITES:
        meta = {SAMPLES_KEY: SAMPLES[site], "client_name": site}
        plain.accept_model(FLModel(params=updates[site], params_type=ParamsType.FULL, meta=meta, current_round=0))
    expected = plain.aggregate_model().params

    decrypted = _decrypted(result, contexts["client"])
    for key, shape in SHAPES.items():
        assert decrypted[key].shape == shape and decrypted[key].dtype == torch.float32
        error = float((decrypted[key] - expected[key]).abs().max())
        assert error < ENCODING_ERROR, (key, error)
        assert float(expected[key].abs().max()) > 100 * ENCODING_ERROR  # the check is not vacuous


def test_the_server_cannot_decrypt_what_it_holds(contexts):
    """The server's provisioned context has no secret key, and neither does a site's ciphertext as it arrives."""
    received = _over_the_wire(ts.ckks_vector(contexts["client"], [0.5, -1.0]))
    assert not contexts["server"].has_secret_key()
    assert not received.context().has_secret_key()
    with pytest.raises(ValueError):
        received.decrypt()


def _with(model: FLModel, **changes) -> FLModel:
    params = {**model.params, **changes.pop("params", {})}
    for key in changes.pop("drop", ()):
        params.pop(key)
    meta = {**model.meta, **changes.pop("meta", {})}
    return FLModel(params=params, params_type=changes.pop("params_type", ParamsType.FULL), meta=meta, **changes)


MALFORMED = [
    ("plaintext instead of a ciphertext", {"params": {HEAD: torch.zeros(2, 64)}}, "not a CKKS ciphertext"),
    ("a ciphertext of the wrong size", {"params": {HEAD: "short"}}, "encrypts 5 values"),
    ("a shared key missing", {"drop": [HEAD]}, "missing"),
    (
        "a key outside the shared set",
        {"params": {HEAD.replace("cls", "x").replace("pred", "lora_A.local"): 1}},
        "outside",
    ),
    ("another algorithm", {"meta": {MetaKey.PROCESSED_ALGORITHM: "BFV"}}, "aggregates CKKS"),
    ("a sample count over the bound", {"meta": {SAMPLES_KEY: 10**9}}, "must be an integer"),
    ("a sample count that is not an integer", {"meta": {SAMPLES_KEY: 2.5}}, "must be an integer"),
    ("an update for another round", {"current_round": 3}, "for round 3"),
    ("a difference instead of weights", {"params_type": ParamsType.DIFF}, "params type"),
]


@pytest.mark.parametrize(("changes", "reason"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_malformed_encrypted_update_is_refused_and_the_others_count(
    contexts, server_context, tmp_path, changes, reason
):
    """What the server can still check on ciphertexts (keys, element counts, algorithm, counts, round) it checks."""
    updates = _updates()
    aggregator = _aggregator(server_context, tmp_path)
    if changes.get("params", {}).get(HEAD) == "short":
        changes = {"params": {HEAD: ts.ckks_vector(contexts["client"], [0.0] * 5)}}
    bad = _with(_encrypted("ge", updates["ge"], contexts["client"]), **changes)
    assert not aggregator.accept_model(bad)
    for site in ("siemens", "philips"):
        assert aggregator.accept_model(_encrypted(site, updates[site], contexts["client"]))
    result = aggregator.aggregate_model()
    assert reason in result.meta["rejected"]["ge"], result.meta["rejected"]
    assert set(result.meta["contributors"]) == {"siemens", "philips"}


def test_later_rounds_check_against_the_encrypted_global_model(contexts, server_context, tmp_path):
    updates = _updates()
    aggregator = _aggregator(server_context, tmp_path)
    for site in SITES[:2]:
        aggregator.accept_model(_encrypted(site, updates[site], contexts["client"]))
    encrypted_global = aggregator.aggregate_model().params
    aggregator.expect(encrypted_global, 1)
    model = _encrypted("ge", updates["ge"], contexts["client"])
    model.current_round = 1
    assert aggregator.accept_model(model)
    with pytest.raises(ValueError, match="keys changed"):
        aggregator.expect({GLOBAL_A: encrypted_global[GLOBAL_A]}, 2)


def test_norm_clipping_is_not_offered_on_ciphertexts():
    with pytest.raises(TypeError):
        EncryptedSharedKeyAggregator(get_policy("med_duallora").to_dict(), clip_update_norm=1.0)


def _global_model(contexts, **meta_changes) -> FLModel:
    vectors = {key: ts.ckks_vector(contexts["client"], [0.25] * (r * c)).serialize() for key, (r, c) in SHAPES.items()}
    meta = {
        MetaKey.PROCESSED_KEYS: {key: True for key in SHAPES},
        MetaKey.PROCESSED_ALGORITHM: "CKKS",
        SHAPES_KEY: {key: list(shape) for key, shape in SHAPES.items()},
        **meta_changes,
    }
    return FLModel(params=vectors, meta=meta)


@pytest.mark.parametrize(
    ("meta_changes", "message"),
    [
        ({SHAPES_KEY: None}, SHAPES_KEY),
        ({SHAPES_KEY: {GLOBAL_A: [8, 64]}}, SHAPES_KEY),
        ({SHAPES_KEY: {GLOBAL_A: [8, 65], GLOBAL_B: [192, 8], HEAD: [2, 64]}}, GLOBAL_A),
        ({MetaKey.PROCESSED_ALGORITHM: "BFV"}, "BFV"),
    ],
    ids=["no shapes", "shapes of some keys", "a shape that does not fit", "another algorithm"],
)
def test_a_site_refuses_an_encrypted_model_it_cannot_restore(contexts, meta_changes, message):
    """Never passed on as ciphertext or as a flat list: the task fails, naming the field or the key."""
    with pytest.raises(DecryptionError, match=message):
        _decrypted(_global_model(contexts, **meta_changes), contexts["client"])


def test_a_site_restores_an_encrypted_model(contexts):
    decrypted = _decrypted(_global_model(contexts), contexts["client"])
    assert {key: tuple(value.shape) for key, value in decrypted.items()} == SHAPES
    assert abs(float(decrypted[HEAD].mean()) - 0.25) < ENCODING_ERROR


def test_a_plaintext_model_passes_the_decryptor_unchanged(contexts):
    """Round 0 sends the initial model in the clear: there is nothing to decrypt."""
    decryptor = DecryptSharedWeights()
    decryptor.tenseal_context = contexts["client"]
    dxo = DXO(DataKind.WEIGHTS, data={HEAD: torch.ones(2, 64)})
    assert decryptor.process_dxo(dxo, dxo.to_shareable(), FLContext()) is None


def test_the_job_names_the_aggregator_that_exists():
    assert SECURE_AGGREGATOR == f"{EncryptedSharedKeyAggregator.__module__}.{EncryptedSharedKeyAggregator.__name__}"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"compression": "fp16"}, "compression"),
        ({"clip_update_norm": 1.0}, "clip_update_norm"),
        ({"resume_from": "FL_global_model.pt", "start_round": 2}, "resume_from"),
        ({"method": "local_only"}, "shares nothing"),
    ],
    ids=["compression", "clipping", "resume", "local_only"],
)
def test_what_secure_aggregation_cannot_be_combined_with_is_refused(changes, named):
    with pytest.raises(ValueError, match=named):
        FederationConfig.for_method(**{"secure_aggregation": True, **changes})


def test_the_simulator_refuses_it_with_the_reason(tmp_path, capsys):
    with pytest.raises(SystemExit, match="#1959"):
        job_main(["simulate", "--secure-aggregation", "--workspace", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_the_job_encrypts_after_the_privacy_filter_and_decrypts_every_global_model(tmp_path, filter_chains):
    job = export_job(FederationConfig.for_method(rounds=1, secure_aggregation=True), tmp_path)
    chains = filter_chains(job)
    for task in ("train", "validate"):  # the validate task's results carry metrics only, which pass unchanged
        assert chains[("client", "task_result_filters", task)] == ["SharedKeysOnly", "EncryptSharedWeights"]
    for task in ("train", "validate"):
        assert chains[("client", "task_data_filters", task)] == ["DecryptSharedWeights"]
    assert chains[("server", "task_result_filters", "train")] == ["PayloadMeter"]
    assert uses_secure_aggregation(job)
    assert not uses_secure_aggregation(export_job(FederationConfig.for_method(rounds=1), tmp_path / "plain"))


def test_poc_provisioning_writes_the_contexts_before_signing():
    builders = [entry["path"] for entry in loopback_project(SITES, 8002, homomorphic_encryption=True)["builders"]]
    assert builders.index("nvflare.lighter.impl.he.HEBuilder") < builders.index(
        "nvflare.lighter.impl.signature.SignatureBuilder"
    )
    plain = [entry["path"] for entry in loopback_project(SITES, 8002)["builders"]]
    assert "nvflare.lighter.impl.he.HEBuilder" not in plain


def test_metrics_pass_the_encryptor_unchanged(contexts):
    """The validate task's results (metrics, no weights) go through the same chain."""
    encryptor = EncryptSharedWeights()
    encryptor.tenseal_context = contexts["client"]
    metrics = DXO(DataKind.METRICS, data={"val_auroc": 0.8})
    shareable = encryptor.process(metrics.to_shareable(), FLContext())
    assert from_shareable(shareable).data == {"val_auroc": 0.8}
