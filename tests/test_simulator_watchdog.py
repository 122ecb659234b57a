"""The one simulator runner (jobs.simulate): a run that stops making progress is stopped with the processes working
in its workspace, a run that keeps writing is left to finish, and rounds are reported as the server starts them."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from jobs.simulate import latest_round, watch


def test_a_silent_simulator_is_stopped_with_its_workers(tmp_path):
    workspace = tmp_path / "workspace"
    (workspace / "server").mkdir(parents=True)
    # Stands in for a site worker NVFlare starts in a session of its own, its workspace on the command line.
    worker = subprocess.Popen(
        [sys.executable, "-c", "import time, sys; time.sleep(120)", str(workspace)], start_new_session=True
    )
    silent_simulator = [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(120)"]
    started = time.monotonic()
    returncode, stopped = watch(silent_simulator, {}, tmp_path / "simulator.log", workspace, stall_seconds=3)
    assert "no progress for 3 s" in stopped and returncode != 0
    assert time.monotonic() - started < 30
    worker.wait(timeout=10)  # ended (its exit status is lost: stop_processes_in reaped it, as it is our child)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(120)" in " ".join(p.info["cmdline"] or [])]


def test_a_simulator_that_keeps_writing_is_left_to_finish(tmp_path):
    workspace = tmp_path / "workspace"
    chatty = [sys.executable, "-c", "import time\nfor i in range(4):\n    print(i, flush=True); time.sleep(1.5)"]
    log = tmp_path / "simulator.log"
    assert watch(chatty, {}, log, workspace, stall_seconds=3) == (0, "")
    assert log.read_text().split() == ["0", "1", "2", "3"]


def test_a_run_past_its_timeout_is_stopped(tmp_path):
    chatty_forever = [sys.executable, "-c", "import time\nwhile True:\n    print(1, flush=True); time.sleep(0.5)"]
    _, stopped = watch(chatty_forever, {}, tmp_path / "simulator.log", tmp_path / "ws", stall_seconds=60, timeout=3)
    assert "ran past 3 s" in stopped


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        ("", None),
        ("2026 - ScatterAndGather - INFO - Round 0 started.\n", 0),
        ("x - Round 0 started.\nx - Round 1 started.\nx - Round 12 of something\n", 1),
    ],
)
def test_rounds_are_read_from_the_server_log(tmp_path, log, expected):
    server_log = tmp_path / "log.txt"
    server_log.write_text(log)
    assert latest_round(server_log) == expected


def test_progress_reports_each_round_once(tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "server").mkdir(parents=True)
    script = (
        "import time, pathlib\n"
        f"log = pathlib.Path({str(workspace / 'server' / 'log.txt')!r})\n"
        "for r in range(3):\n"
        "    with log.open('a') as f: f.write(f'x - Round {r} started.\\n')\n"
        "    time.sleep(2.5)\n"
    )
    seen: list[int] = []
    watch([sys.executable, "-c", script], {}, tmp_path / "sim.log", workspace, stall_seconds=30, on_round=seen.append)
    assert seen == [0, 1, 2]
