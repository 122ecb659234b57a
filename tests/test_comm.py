"""Payload metering (custom.comm.payload_bytes) leaves NVFlare's serialization intact in the process that measures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What a running NVFlare process (the server answering an admin's login challenge) sends: a Shareable holding bytes.
ENCODE_AS_NVFLARE_DOES = """
import sys
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.decomposers import flare_decomposers
from nvflare.fuel.utils import fobs
flare_decomposers.register()
reply = Shareable()
reply["cert"] = b"-----BEGIN CERTIFICATE-----"
open(sys.argv[1], "wb").write(fobs.dumps(reply))
"""

# A process that measures a payload first (a test, a bench script, `jobs.job submit`), then decodes NVFlare's reply.
MEASURE_THEN_DECODE = """
import sys
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.utils.decomposers import flare_decomposers
from nvflare.fuel.utils import fobs
from custom.comm import payload_bytes
payload_bytes(DXO(DataKind.WEIGHTS, data={"w": torch.zeros(3)}).to_shareable())
flare_decomposers.register()  # what NVFlare's admin client does when it connects
print(fobs.loads(open(sys.argv[1], "rb").read()).get("cert"))
"""


def test_measuring_a_payload_does_not_break_decoding_nvflare_replies_later(tmp_path: Path) -> None:
    """FOBS auto-registers a generic decomposer for a type it meets before NVFlare registers its own, and then
    ignores NVFlare's. A Shareable from a real NVFlare process then decodes without its items: this is how an
    in-process measurement once broke the POC admin's login (the server's certificate came back as None)."""
    encoded = tmp_path / "reply.fobs"

    def python(script: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, str(encoded)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    python(ENCODE_AS_NVFLARE_DOES)
    assert python(MEASURE_THEN_DECODE) == str(b"-----BEGIN CERTIFICATE-----")
