"""Atomic file writes: write to a temporary name in the same folder, then rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

import torch


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temporary file next to `path`, then rename it to `path` (readers never see half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_json_atomic(path: str, payload: Any) -> None:
    """Write `payload` as indented JSON."""
    write_atomic(path, lambda stream: stream.write((json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()))


def torch_save_atomic(path: str, payload: Any) -> None:
    """`torch.save` `payload` to `path`."""
    write_atomic(path, lambda stream: torch.save(payload, stream))
