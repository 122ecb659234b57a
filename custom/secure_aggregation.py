"""Secure aggregation of the shared keys with NVFlare's homomorphic encryption (TenSEAL CKKS): each site encrypts its
update, the server sums ciphertexts it cannot read, and only the sites decrypt the new global model.

NVFlare's HE pieces are built for ScatterAndGather (a Shareable aggregator); the job's workflow is a FedAvg
ModelController. So the site filters are NVFlare's `HEModelEncryptor` and `HEModelDecryptor`, given what they need
(numpy arrays, the sample count as the weight; shapes restored after decryption), and the server's accumulation is
`EncryptedSharedKeyAggregator`, the job's validated aggregator with the arithmetic done on ciphertexts.

The contexts are provisioned (nvflare.lighter.impl.he.HEBuilder): every site holds the same secret key, the server
a context without it. This protects each site's update from the server; it does not protect one site's update from
another site that could read it (docs/privacy.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tenseal as ts
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_opt.he import decomposers
from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
from nvflare.lighter.constants import ProvFileName

from custom.aggregators import DEFAULT_MAX_SAMPLES_PER_SITE, AcceptedUpdate, SharedKeyAggregator
from models.protocol import SAMPLES_KEY, SHAPES_KEY

CLIENT_CONTEXT = ProvFileName.CLIENT_CONTEXT_TENSEAL
"""A site's provisioned context (with the shared secret key), in its startup kit."""


class DecryptionError(ValueError):
    """An encrypted global model a site cannot turn back into its shared keys (names the key or field)."""


class EncryptSharedWeights(HEModelEncryptor):
    """Site result filter: every shared tensor encrypted with the site's provisioned CKKS context, multiplied first by
    the site's training-sample count, so that the server's sum over sites is the numerator of the weighted mean.

    Runs after SharedKeysOnly (which keeps the sample count in the metadata); NVFlare's encryptor reads the weight
    from `NUM_STEPS_CURRENT_ROUND` and needs numpy arrays.
    """

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT):
        super().__init__(
            tenseal_context_file=tenseal_context_file, weigh_by_local_iter=True, data_kinds=[DataKind.WEIGHTS]
        )

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if self.encrypt_layers is None:  # NVFlare sets this at START_RUN; a filter built later must still encrypt all
            self.encrypt_layers = [True]
        dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, dxo.get_meta_prop(SAMPLES_KEY))
        dxo.data = {key: _as_float64_array(value) for key, value in dxo.data.items()}
        return super().process_dxo(dxo, shareable, fl_ctx)


class DecryptSharedWeights(HEModelDecryptor):
    """Site task-data filter: the encrypted global model decrypted with the site's context and reshaped to the shapes
    the server sent, as float32 tensors. A plaintext model (round 0's initial one) passes unchanged; an encrypted one
    it cannot restore is refused (DecryptionError), never passed on as ciphertext."""

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT):
        super().__init__(tenseal_context_file=tenseal_context_file, data_kinds=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        encrypted = dxo.get_meta_prop(MetaKey.PROCESSED_KEYS)
        if not encrypted:
            return None
        algorithm = dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM)
        if algorithm != HE_ALGORITHM_CKKS:
            raise DecryptionError(f"meta[{MetaKey.PROCESSED_ALGORITHM!r}] is {algorithm!r}, not {HE_ALGORITHM_CKKS}")
        shapes = dxo.get_meta_prop(SHAPES_KEY)
        if not isinstance(shapes, dict) or set(shapes) != set(dxo.data) or not all(encrypted.get(k) for k in shapes):
            raise DecryptionError(f"meta[{SHAPES_KEY!r}] must name every encrypted key of the global model")
        super().process_dxo(dxo, shareable, fl_ctx)
        dxo.data = {key: _restored(key, dxo.data[key], shapes[key]) for key in dxo.data}
        dxo.remove_meta_props([SHAPES_KEY])
        dxo.update_shareable(shareable)
        return dxo


class EncryptedSharedKeyAggregator(SharedKeyAggregator):
    """SharedKeyAggregator on ciphertexts: the sum of the sites' encrypted, count-weighted updates times 1 / (total
    count), sent back serialized (the sites hold the context to read it).

    Still checked for every update: exactly the policy's shared keys, each a CKKS vector of the key's size, the
    algorithm, FULL params, one update per site and round for the current round, the sample count in bounds and the
    ε. Not checkable on ciphertexts, and so not checked: finite values, shapes beyond the element count, that a
    site's values were weighted by the count it claims, that it encrypted under the provisioned key, and norm
    clipping (refused).
    """

    def __init__(
        self,
        policy: dict[str, Any],
        min_updates: int = 1,
        max_samples_per_site: int = DEFAULT_MAX_SAMPLES_PER_SITE,
    ):
        super().__init__(policy, min_updates=min_updates, max_samples_per_site=max_samples_per_site)
        decomposers.register()  # ciphertexts arrive with their context (NVFlare's CKKSVector decomposer)

    def expect(self, global_params: dict[str, Any], current_round: int | None) -> None:
        """Round 0 sends the plaintext initial model: its shapes are kept (on the meta device, no values). Later
        rounds send the serialized ciphertexts of the previous mean: they must hold the same keys."""
        if all(isinstance(value, bytes) for value in global_params.values()) and self._reference is not None:
            if set(global_params) != set(self._reference):
                raise ValueError("the encrypted global model's keys changed between rounds")
            with self._lock:
                self._expected_round = current_round
            return
        super().expect(global_params, current_round)
        with self._lock:
            self._reference = {key: value.to("meta") for key, value in (self._reference or {}).items()}

    def _checked_value(self, key: str, value: Any, expected: torch.Tensor) -> tuple[Any, str]:
        if not isinstance(value, ts.CKKSVector):
            return None, f"{key} is {type(value).__name__}, not a CKKS ciphertext"
        if value.size() != expected.numel():
            shape = tuple(expected.shape)
            return None, f"{key} encrypts {value.size()} values; {shape} in the global model is {expected.numel()}"
        return value, ""

    def _validated(
        self, site: str, model: FLModel, params: dict[str, Any], outside: list[str], samples: Any
    ) -> tuple[AcceptedUpdate | None, str]:
        algorithm = (model.meta or {}).get(MetaKey.PROCESSED_ALGORITHM)
        if params and algorithm != HE_ALGORITHM_CKKS:
            return None, f"meta[{MetaKey.PROCESSED_ALGORITHM!r}] is {algorithm!r}: the job aggregates CKKS ciphertexts"
        return super()._validated(site, model, params, outside, samples)

    def _weighted_means(self, updates: list[AcceptedUpdate], current_round: int | None) -> dict[str, Any]:
        scale = 1.0 / sum(update.samples for update in updates)
        means = {}
        for key in self._reference or {}:
            total = updates[0].params[key]
            for update in updates[1:]:
                total = total + update.params[key]
            means[key] = (total * scale).serialize()
        return means

    def _describe(self, params: dict[str, Any]) -> str:
        return f"encrypted ({sum(len(value) for value in params.values())} bytes of ciphertext)"

    def _result_meta(self) -> dict[str, Any]:
        return {
            MetaKey.PROCESSED_KEYS: {key: True for key in self._reference or {}},
            MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM_CKKS,
            SHAPES_KEY: {key: list(value.shape) for key, value in (self._reference or {}).items()},
        }


def _as_float64_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _restored(key: str, values: Any, shape: Any) -> torch.Tensor:
    """Decrypted values (a flat list) as a float32 tensor of `shape`; DecryptionError naming the key otherwise."""
    tensor = torch.as_tensor(values, dtype=torch.float32)
    try:
        return tensor.reshape([int(size) for size in shape])
    except (RuntimeError, TypeError, ValueError) as error:
        raise DecryptionError(f"{key}: {tensor.numel()} decrypted values do not fit shape {shape} ({error})") from None
