"""The simulator runner (jobs.simulate) against a fake `nvflare simulator`: port clashes stop a run at once and are
retried in a fresh workspace, other failures are not (unless asked), the sites' epoch lines are reported once each,
and the output log is read as it grows, never again.

The fake is a small Python script standing in for `nvflare simulator`: it prints what the real one prints (a site
worker's `OSError: [Errno 98] Address already in use`, NVFlare's `Failed to create connection to the child
process`, the sites' progress lines, the server's round lines) and then hangs or exits. A fake is the only way to
test this: the real clash is a race with other processes' ephemeral ports and cannot be provoked on demand.
"""

from __future__ import annotations

import builtins
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from jobs import simulate
from jobs.job import simulate as job_simulate
from jobs.recipe import FederationConfig
from jobs.simulate import (
    PORT_CLASH,
    LogTail,
    RunMonitor,
    SiteProgress,
    last_epochs_only,
    parse_progress,
    run_simulator,
    watch,
)

SITES = ("ge", "canon")
STALL_SECONDS = 30  # a run the runner fails to stop as it should is stopped in 30 s, not the default 240 s
BIND_ERROR = "OSError: [Errno 98] Address already in use"
NO_CHILD = "RuntimeError: Failed to create connection to the child process in SimulatorRunner, timeout: 60.0"

FAKE_SIMULATOR = f"""#!{sys.executable}
# A fake `nvflare simulator JOB -w WS -c SITES -t N`. FAKE_PLAN lists what each start does (the last entry repeats):
# clash / no_child (a port clash, then hang), fail (exit 1, no artifacts), complete (a finished run's artifacts).
import os, pathlib, sys, time

args = sys.argv[1:]
workspace = pathlib.Path(args[args.index("-w") + 1])
sites = args[args.index("-c") + 1].split(",")
starts = pathlib.Path(os.environ["FAKE_STARTS"])
attempt = len(starts.read_text().split()) + 1 if starts.exists() else 1
starts.write_text(starts.read_text() + f"{{attempt}}\\n" if starts.exists() else "1\\n")
plans = os.environ["FAKE_PLAN"].split(",")
plan = plans[min(attempt, len(plans)) - 1]
print("WARNING: 'nvflare simulator' is deprecated.", flush=True)
server = workspace / "server"
server.mkdir(parents=True, exist_ok=True)
log = server / "log.txt"
log.write_text("x - Round 0 started.\\n")
if plan in ("clash", "no_child"):
    print("Traceback (most recent call last):", flush=True)
    print({BIND_ERROR!r} if plan == "clash" else {NO_CHILD!r}, flush=True)
    time.sleep(600)
if plan == "fail":
    print("x - ERROR - something else went wrong", flush=True)
    sys.exit(1)
mark = "med-duallora progress:"
print(f"2026-01-01 10:00:00,000 - INFO - {{mark}} site=ge round=0 epoch=1/2 train_loss=0.6931 lr=0.001", flush=True)
print(f"{{mark}} site=ge round=0 epoch=1/2 train_loss=0.6931", flush=True)  # the same epoch again (a logger's echo)
print(f"{{mark}} site=ge round=0 epoch=oops", flush=True)  # malformed: ignored
sys.stdout.write(f"{{mark}} site=canon round=0 ep")  # a line written in two pieces, across polls
sys.stdout.flush()
time.sleep(0.5)
print("och=1/2 train_loss=0.7000", flush=True)
time.sleep(0.5)
with log.open("a") as handle:
    handle.write("x - Round 1 started.\\n")
time.sleep(0.5)
print(f"{{mark}} site=ge round=1 epoch=2/2 train_loss=0.5312", flush=True)
app = server / "simulate_job" / "app_server"
app.mkdir(parents=True)
(app / "FL_global_model.pt").write_bytes(b"model")
(server / "simulate_job" / "global_model").mkdir()
(server / "simulate_job" / "global_model" / "metadata.json").write_text("{{}}")
for site in sites:
    (workspace / site / "simulate_job" / "personalised_model").mkdir(parents=True)
    (workspace / site / "simulate_job" / "personalised_model" / "metadata.json").write_text("{{}}")
    (workspace / site / "simulate_job" / "test_metrics.json").write_text("{{}}")
with log.open("a") as handle:
    handle.write("x - Finished FedAvg.\\n")
"""


@pytest.fixture
def fake_simulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake installed as this runner's `nvflare` command, polled every 0.2 s; returns its start-count file."""
    script = tmp_path / "fake_nvflare"
    script.write_text(FAKE_SIMULATOR)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(simulate, "nvflare_executable", lambda: str(script))
    monkeypatch.setattr(simulate, "POLL_SECONDS", 0.2)
    starts = tmp_path / "starts.txt"
    monkeypatch.setenv("FAKE_STARTS", str(starts))
    return starts


def _fake_command(workspace: Path) -> list[str]:
    return [simulate.nvflare_executable(), "simulator", "job", "-w", str(workspace), "-c", ",".join(SITES), "-t", "2"]


def _starts(starts: Path) -> int:
    return len(starts.read_text().split()) if starts.exists() else 0


@pytest.mark.parametrize(("plan", "signature"), [("clash", BIND_ERROR), ("no_child", NO_CHILD)])
def test_a_port_clash_stops_the_run_at_once(fake_simulator, tmp_path, monkeypatch, plan, signature):
    monkeypatch.setenv("FAKE_PLAN", plan)
    command, log = _fake_command(tmp_path / "ws"), tmp_path / "sim.log"
    started = time.monotonic()
    returncode, stopped = watch(command, dict(os.environ), log, tmp_path / "ws", stall_seconds=STALL_SECONDS)
    assert time.monotonic() - started < 10, "not stopped at once"
    assert stopped.startswith(PORT_CLASH) and signature in stopped and returncode != 0


def test_a_port_clash_is_retried_in_a_fresh_workspace(fake_simulator, tmp_path, monkeypatch):
    """The second start completes; the first attempt's output is kept, the state folder given is cleared, the
    retry is reported, and nothing else is touched."""
    monkeypatch.setenv("FAKE_PLAN", "clash,complete")
    state, other = tmp_path / "site_state", tmp_path / "someone_elses_state"
    for folder in (state, other):
        (folder / "ge").mkdir(parents=True)
    lines: list[str] = []
    run = run_simulator(
        tmp_path / "job",
        tmp_path / "ws",
        SITES,
        log_file=tmp_path / "sim.log",
        progress=lines.append,
        clear_before_retry=[state],
        stall_seconds=STALL_SECONDS,
    )
    assert run.problems() == [] and _starts(fake_simulator) == 2
    assert BIND_ERROR in (tmp_path / "sim.log.attempt1").read_text()
    assert BIND_ERROR not in (tmp_path / "sim.log").read_text()
    assert not state.exists() and (other / "ge").is_dir()
    assert any(line.startswith(f"attempt 1 did not complete ({PORT_CLASH}") for line in lines), lines


def test_port_clashes_are_retried_twice_in_all_by_default(fake_simulator, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PLAN", "clash")
    run = run_simulator(tmp_path / "job", tmp_path / "ws", SITES, log_file=tmp_path / "sim.log", stall_seconds=5)
    assert run.port_clash and _starts(fake_simulator) == 2


def test_another_failure_is_not_retried_unless_asked(fake_simulator, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PLAN", "fail,fail,complete")
    lines: list[str] = []
    run = run_simulator(tmp_path / "job", tmp_path / "ws", SITES, log_file=tmp_path / "sim.log", progress=lines.append)
    assert run.problems() and not run.port_clash and _starts(fake_simulator) == 1
    assert not (tmp_path / "sim.log.attempt1").exists() and not any("attempt" in line for line in lines)
    asked = run_simulator(tmp_path / "job", tmp_path / "ws2", SITES, log_file=tmp_path / "sim2.log", attempts=2)
    assert asked.problems() == [] and _starts(fake_simulator) == 3


def test_each_site_epoch_is_reported_once_as_it_comes(fake_simulator, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PLAN", "complete")
    rounds: list[int] = []
    epochs: list[SiteProgress] = []
    command = _fake_command(tmp_path / "ws")
    watch(
        command,
        dict(os.environ),
        tmp_path / "sim.log",
        tmp_path / "ws",
        on_round=rounds.append,
        on_progress=epochs.append,
    )
    assert rounds == [0, 1]
    assert epochs == [
        SiteProgress("ge", 0, 1, 2, 0.6931),
        SiteProgress("canon", 0, 1, 2, 0.7),
        SiteProgress("ge", 1, 2, 2, 0.5312),
    ]


def test_job_py_simulate_prints_the_progress_as_it_comes(fake_simulator, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_PLAN", "complete")
    config = FederationConfig.for_method(sites=SITES, min_clients=2)
    assert job_simulate(config, str(tmp_path / "sim"), 2, {"byoc": False, "site_installed": False}) == 0
    out = capsys.readouterr().out
    assert "  round 1/5 started\n" in out
    assert "  round 1/5  ge  epoch 1/2  train_loss 0.693\n" in out
    assert "  round 2/5  ge  epoch 2/2  train_loss 0.531\n" in out
    assert out.count("  ge  epoch 1/2") == 1 and "epoch oops" not in out


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("med-duallora progress: site=ge round=2 epoch=3/20 train_loss=0.5312", SiteProgress("ge", 2, 3, 20, 0.5312)),
        (
            "2026-11-30 10:26:21,300 - ClientTaskWorker - INFO - med-duallora progress: site=canon round=0 "
            "epoch=1/5 train_loss=1.5 val_loss=2 lr=1e-3",
            SiteProgress("canon", 0, 1, 5, 1.5),
        ),
        ("med-duallora progress: site=ge round=1 epoch=2/4", SiteProgress("ge", 1, 2, 4, None)),
        (
            "med-duallora progress: site=ge round=1 epoch=2/4 train_loss=0.5 seed=2",
            SiteProgress("ge", 1, 2, 4, 0.5, seed=2),
        ),
        ("med-duallora progress: site=ge round=x epoch=2/4 train_loss=1", None),
        ("med-duallora progress: site=ge epoch=2/4", None),
        ("x - Round 2 started.", None),
    ],
)
def test_progress_lines_are_parsed(line, expected):
    assert parse_progress(line) == expected


def test_each_replica_reports_its_rounds_and_epochs(tmp_path):
    """In a job of several replicas every seed counts its rounds from 0 again: each replica's rounds and epochs are
    reported, and an epoch line says which seed it belongs to."""
    (tmp_path / "ws" / "server").mkdir(parents=True)
    rounds: list[int] = []
    epochs: list[SiteProgress] = []
    monitor = RunMonitor(tmp_path / "sim.log", tmp_path / "ws", rounds.append, epochs.append)
    server = [
        "replica seed 1 (1/2)",
        "Round 0 started.",
        "Round 1 started.",
        "replica seed 0 (2/2)",
        "Round 0 started.",
    ]
    (tmp_path / "ws" / "server" / "log.txt").write_text("".join(f"x - INFO - {line}\n" for line in server))
    progress = [f"med-duallora progress: site=ge round=0 epoch=1/1 train_loss=0.5 seed={seed}" for seed in (1, 0, 0)]
    (tmp_path / "sim.log").write_text("".join(f"{line}\n" for line in progress))
    monitor.read(final=True)
    assert rounds == [0, 1, 0]
    assert epochs == [SiteProgress("ge", 0, 1, 1, 0.5, seed=1), SiteProgress("ge", 0, 1, 1, 0.5, seed=0)]
    assert epochs[0].describe(2) == "seed 1  round 1/2  ge  epoch 1/1  train_loss 0.500"


def test_the_log_is_read_as_it_grows_never_again(tmp_path, monkeypatch):
    """Every byte of the file is read once, whatever the number of polls; a partial line waits for its end."""
    log = tmp_path / "sim.log"
    read = []

    class CountingFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def read(self, *args):
            data = self.handle.read(*args)
            read.append(len(data))
            return data

    monkeypatch.setattr(simulate, "open", lambda *a, **k: CountingFile(builtins.open(*a, **k)), raising=False)
    tail = LogTail(log)
    assert tail.new_lines() == []
    log.write_text("one\ntwo\nthr")
    assert tail.new_lines() == ["one", "two"]
    for _ in range(5):
        assert tail.new_lines() == []
    with log.open("a") as handle:
        handle.write("ee\nfour\n")
    assert tail.new_lines() == ["three", "four"]
    assert sum(read) == log.stat().st_size


def test_a_replaced_log_is_read_from_its_start_and_an_old_one_skipped(tmp_path):
    """The simulator wipes its workspace: the server log of an earlier run there is not this run's."""
    log = tmp_path / "log.txt"
    log.write_text("x - Round 4 started.\n" * 10)
    tail = LogTail(log, skip_existing=True)
    assert tail.new_lines() == []
    log.unlink()
    log.write_text("x - Round 0 started.\n")
    assert tail.new_lines() == ["x - Round 0 started."]


def test_the_demo_and_the_benchmark_see_each_sites_last_epoch_of_a_round_only():
    lines = [
        "round 1/5 started",
        "round 1/5  ge  epoch 3/20  train_loss 0.500",
        "round 1/5  ge  epoch 20/20  train_loss 0.400",
        "round 1/5  canon  epoch 20/20",
        "attempt 1 was lost to a port clash; starting again in a fresh workspace",
    ]
    shown: list[str] = []
    say = last_epochs_only(shown.append)
    for line in lines:
        say(line)
    assert shown == [lines[0], lines[2], lines[3], lines[4]]
