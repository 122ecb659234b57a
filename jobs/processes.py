"""Find and stop the processes working in a folder (NVFlare starts site workers in sessions of their own)."""

from __future__ import annotations

import contextlib
import os
import threading
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


def listening_sockets(folder: str | Path) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket listening in a process working in `folder`."""
    pids = {process.pid for process in processes_in(folder)}
    with contextlib.suppress(psutil.Error):
        return {
            (connection.laddr.ip, connection.laddr.port)
            for connection in psutil.net_connections(kind="tcp")
            if connection.status == psutil.CONN_LISTEN and connection.pid in pids
        }
    return set()


class ListeningSockets:
    """Every listening socket the processes working in a folder open, sampled in the background until `stop`."""

    def __init__(self, folder: str | Path, interval_seconds: float = 1.0):
        self.folder = folder
        self.interval_seconds = interval_seconds
        self.seen: set[tuple[str, int]] = set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.is_set():
            self.seen |= listening_sockets(self.folder)
            self._stopped.wait(self.interval_seconds)

    def stop(self) -> set[tuple[str, int]]:
        """Stop sampling; what was seen."""
        self._stopped.set()
        self._thread.join()
        return self.seen
