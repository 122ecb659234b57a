"""Atomic file writes shared by every package: a temporary sibling, fsync, then a rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]


@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file name next to `path` for writers that need a name (its `suffix` may select a format).

    On success the file is fsynced and renamed over `path`; on any error it is removed and the error propagates.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write` on a binary handle to a temporary file next to `path`, then rename it to `path`."""
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        write(stream)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    write_atomic(path, lambda stream: stream.write(data))


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (newlines kept as given)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, payload: Any) -> None:
    """Write `payload` as indented JSON with sorted keys and a final newline, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def torch_save_atomic(path: PathLike, payload: Any) -> None:
    """`torch.save` `payload` to `path` atomically."""
    import torch

    write_atomic(path, lambda stream: torch.save(payload, stream))
