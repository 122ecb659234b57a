"""The process helpers the runners rely on: finding a folder's processes, their listening sockets, stopping them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.processes import ListeningSockets, listening_sockets, processes_in, stop_processes_in

LISTENER = """
import socket, sys, time
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen()
print(server.getsockname()[1], flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0"])
def test_the_sockets_a_folders_processes_listen_on_are_seen(tmp_path: Path, address: str) -> None:
    """A real listening process working in the folder (its script lives there): its address and port are reported,
    whatever the address, so a POC process listening beyond loopback would be caught."""
    script = tmp_path / "listener.py"
    script.write_text(LISTENER)
    watch = ListeningSockets(tmp_path, interval_seconds=0.2)
    listener = subprocess.Popen([sys.executable, str(script), address], stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        assert (address, port) in listening_sockets(tmp_path)
        time.sleep(0.5)
    finally:
        stop_processes_in(tmp_path)
        listener.wait()
    assert (address, port) in watch.stop()
    assert processes_in(tmp_path) == [] and listening_sockets(tmp_path) == set()
