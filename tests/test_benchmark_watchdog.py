"""A simulator run that stops making progress is stopped, with the processes working in its workspace."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from app.benchmark_runs import _run_with_round_progress


def test_a_silent_simulator_is_stopped_with_its_workers(tmp_path):
    workspace = tmp_path / "workspace"
    (workspace / "server").mkdir(parents=True)
    # Stands in for a site worker NVFlare starts in a session of its own, its workspace on the command line.
    worker = subprocess.Popen(
        [sys.executable, "-c", "import time, sys; time.sleep(120)", str(workspace)], start_new_session=True
    )
    silent_simulator = [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(120)"]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no progress for 3 s"):
        _run_with_round_progress(
            silent_simulator, {}, tmp_path / "simulator.log", workspace, 2, "test", lambda _: None, stall_seconds=3
        )
    assert time.monotonic() - started < 30
    assert worker.wait(timeout=10) != 0
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(120)" in " ".join(p.info["cmdline"] or [])]


def test_a_simulator_that_keeps_writing_is_left_to_finish(tmp_path):
    workspace = tmp_path / "workspace"
    chatty = [sys.executable, "-c", "import time\nfor i in range(4):\n    print(i, flush=True); time.sleep(1.5)"]
    log = tmp_path / "simulator.log"
    _run_with_round_progress(chatty, {}, log, workspace, 2, "test", lambda _: None, stall_seconds=3)
    assert log.read_text().split() == ["0", "1", "2", "3"]
