"""Communication accounting: the serialized bytes of every weight payload between the server and each site."""

from __future__ import annotations

import os
import threading
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.decomposers import flare_decomposers
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from models.atomic_io import write_json_atomic
from models.protocol import COMM_DIR, FULL_MODEL_BYTES_KEY

DIRECTIONS = ("up", "down")


def payload_bytes(shareable: Shareable) -> int:
    """Length of the FOBS encoding NVFlare sends for `shareable`, tensors inline as safetensors blobs.

    Over a live connection NVFlare moves tensors above its streaming threshold as separately downloaded chunks of
    the same safetensors bytes; chunk framing and transport headers (gRPC/TCP, TLS) are not counted here.
    """
    # NVFlare's own decomposers first, as its processes do. Otherwise FOBS auto-registers a generic data-class
    # decomposer for Shareable, and NVFlare's later registration of the right one is silently ignored: in a process
    # that then opens an admin session (tests, job submission), the server's login challenge decodes without its
    # certificate.
    flare_decomposers.register()
    fobs.register(TensorDecomposer)
    return len(fobs.dumps(shareable))


def tensor_bytes(params: dict[str, Any]) -> tuple[int, int]:
    """Raw bytes (numel x element size) and count of the tensors or arrays in a parameter dict."""
    sizes = [int(value.nbytes) for value in params.values() if hasattr(value, "nbytes")]
    return sum(sizes), len(sizes)


class PayloadMeter(Filter):
    """Server filter that records, per site and round, the bytes of each weight payload it sees.

    Declared as a server task-result filter (`direction="up"`: what a site sent) and as a server task-data filter
    (`direction="down"`: what the server sends a site), on the `train` task. Each record holds the serialized
    payload bytes, the raw tensor bytes and count, and the full-model bytes the site reports in its metadata.
    Records go to `comm/bytes_<direction>.json` in the server run directory and to TensorBoard under
    `tb_events/<site>/` (tags `comm/<direction>_payload_bytes`, `comm/<direction>_tensor_bytes`). It never
    changes the payload.
    """

    def __init__(self, direction: str = "up"):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.direction = direction
        self._records: list[dict[str, Any]] = []
        self._writers: dict[str, Any] = {}
        self._lock = threading.Lock()  # results of different sites arrive on different threads

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code() != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return shareable
        raw, count = tensor_bytes(dxo.data or {})
        site = fl_ctx.get_peer_context().get_identity_name()
        record = {
            "round": shareable.get_header(AppConstants.CURRENT_ROUND),
            "site": site,
            "direction": self.direction,
            "payload_bytes": payload_bytes(shareable),
            "tensor_bytes": raw,
            "n_tensors": count,
            FULL_MODEL_BYTES_KEY: dxo.meta.get(FULL_MODEL_BYTES_KEY),
        }
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        with self._lock:
            self._records.append(record)
            write_json_atomic(os.path.join(run_dir, COMM_DIR, f"bytes_{self.direction}.json"), self._records)
            self._log_scalars(run_dir, record)
        self.log_info(fl_ctx, f"{self.direction} {site} round {record['round']}: {record['payload_bytes']} bytes")
        return shareable

    def _log_scalars(self, run_dir: str, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        site = record["site"]
        if site not in self._writers:
            log_dir = os.path.join(run_dir, "tb_events", site)
            self._writers[site] = SummaryWriter(log_dir=log_dir, filename_suffix=f".comm_{self.direction}")
        writer = self._writers[site]
        for kind in ("payload", "tensor"):
            writer.add_scalar(f"comm/{self.direction}_{kind}_bytes", record[f"{kind}_bytes"], record["round"] or 0)
        writer.flush()
