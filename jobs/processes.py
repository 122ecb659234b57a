"""Find and stop the processes working in a folder (NVFlare starts site workers in sessions of their own)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import psutil


def processes_in(folder: str | Path) -> list[psutil.Process]:
    """Every process, other than this one, whose command line names `folder`."""
    marker = str(folder)
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and marker in " ".join(process.info["cmdline"] or []):
                found.append(process)
    return found


def stop_processes_in(folder: str | Path, grace_seconds: float = 5.0) -> None:
    """Terminate every process working in `folder`, then kill those still alive after `grace_seconds`."""
    processes = processes_in(folder)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_seconds)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_seconds)


def wait_until_gone(folder: str | Path, timeout_seconds: float) -> None:
    """Wait up to `timeout_seconds` for the processes working in `folder` to end by themselves."""
    deadline = time.monotonic() + timeout_seconds
    while processes_in(folder) and time.monotonic() < deadline:
        time.sleep(1)
