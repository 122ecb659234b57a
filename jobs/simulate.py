"""The one simulator runner: `nvflare simulator` with round progress, a stall watchdog, retries, and a completion
check from the run's artifacts (the simulator's exit code is unreliable). The demo, the tests, `jobs/job.py
simulate` and the benchmark all run jobs through it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.processes import stop_processes_in
from models.protocol import AUDIT_FILE, COMM_DIR, GLOBAL_MODEL_FILE, SITES, TEST_METRICS_FILE

SIMULATOR_JOB = "simulate_job"
FINISHED_MARK = "Finished FedAvg."
ROUND_MARK = "Round "
POLL_SECONDS = 2.0
STALL_SECONDS = 240.0
"""A simulator whose output and server log stay unchanged this long is stuck (e.g. a site worker lost to a port
clash, `OSError: [Errno 98] Address already in use`, while the server waits for every site) and is stopped."""


@dataclass
class SimulatorRun:
    """A finished (or stopped) simulator workspace and the artifacts in it."""

    workspace: Path
    sites: tuple[str, ...]
    returncode: int
    seconds: float
    stopped: str = ""
    """Why the runner stopped the simulator (stalled, timed out); empty when it ended by itself."""

    @property
    def server_dir(self) -> Path:
        return self.workspace / "server" / SIMULATOR_JOB

    def site_dir(self, site: str) -> Path:
        return self.workspace / site / SIMULATOR_JOB

    def log(self, participant: str = "server") -> str:
        path = self.workspace / participant / "log.txt"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""

    def error_lines(self) -> list[str]:
        """Every ERROR line (and ConfigError mention) of the server and site logs."""
        lines = []
        for participant in ("server", *self.sites):
            for line in self.log(participant).splitlines():
                if " - ERROR - " in line or "ConfigError" in line:
                    lines.append(f"{participant}: {line}")
        return lines

    def problems(self) -> list[str]:
        """Why the run did not complete; empty when the global model, the end of training and every site's
        test metrics are there, the runner did not stop it, and no log holds an error."""
        found = [self.stopped] if self.stopped else []
        if not self.global_model_path.is_file():
            found.append(f"no {GLOBAL_MODEL_FILE} on the server")
        if FINISHED_MARK not in self.log():
            found.append(f"server log lacks {FINISHED_MARK!r}")
        missing = [site for site in self.sites if not self.test_metrics_path(site).is_file()]
        found += [f"{site}: no {TEST_METRICS_FILE}" for site in missing]
        return found + self.error_lines()

    def test_metrics_path(self, site: str) -> Path:
        return self.site_dir(site) / TEST_METRICS_FILE

    def test_metrics(self, site: str) -> dict[str, Any]:
        return json.loads(self.test_metrics_path(site).read_text(encoding="utf-8"))

    def comm_records(self, direction: str = "up") -> list[dict[str, Any]]:
        path = self.server_dir / COMM_DIR / f"bytes_{direction}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    def received_keys(self) -> list[dict[str, Any]]:
        """The server's audit: one record per received result (round, site, keys, keys outside the policy)."""
        path = self.server_dir / AUDIT_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @property
    def global_model_path(self) -> Path:
        return self.server_dir / "app_server" / GLOBAL_MODEL_FILE

    def global_model(self) -> dict[str, torch.Tensor]:
        saved = torch.load(self.global_model_path, map_location="cpu", weights_only=True)
        return dict(saved["model"])


def latest_round(server_log: Path) -> int | None:
    """The last round the server log says it started (0-based), None before the first."""
    if not server_log.is_file():
        return None
    latest = None
    for line in server_log.read_text(encoding="utf-8", errors="replace").splitlines():
        position = line.find(ROUND_MARK)
        if position >= 0 and line.rstrip(" -").endswith("started."):
            number = line[position + len(ROUND_MARK) :].split(" ", 1)[0]
            if number.isdigit():
                latest = int(number)
    return latest


def watch(
    command: Sequence[str],
    env: dict[str, str],
    log_path: Path,
    workspace: Path,
    stall_seconds: float = STALL_SECONDS,
    timeout: float | None = None,
    on_round: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Run `command` with its output in `log_path`, calling `on_round(r)` when the server starts round r.

    Returns (exit code, why it was stopped or ""). A run whose output and server log stay unchanged for
    `stall_seconds`, or that outlives `timeout`, is stopped with every process working in `workspace`.
    """
    server_log = workspace / "server" / "log.txt"
    reported = -1
    start = last_change = time.monotonic()
    last_sizes = None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            latest = latest_round(server_log)
            if on_round is not None and latest is not None and latest > reported:
                reported = latest
                on_round(latest)
            sizes = tuple(path.stat().st_size if path.exists() else -1 for path in (log_path, server_log))
            if sizes != last_sizes:
                last_sizes, last_change = sizes, time.monotonic()
            reason = ""
            if time.monotonic() - last_change > stall_seconds:
                reason = f"the simulator made no progress for {stall_seconds:.0f} s; see {log_path}"
            elif timeout is not None and time.monotonic() - start > timeout:
                reason = f"the simulator ran past {timeout:.0f} s; see {log_path}"
            if reason:
                process.kill()
                process.wait()
                stop_processes_in(workspace)
                return process.returncode, reason
    return process.returncode, ""


def nvflare_executable() -> str:
    """The `nvflare` command of this interpreter's environment."""
    beside_python = Path(sys.executable).with_name("nvflare")
    found = str(beside_python) if beside_python.exists() else shutil.which("nvflare")
    if not found:
        raise FileNotFoundError(f"no `nvflare` command next to {sys.executable} or on PATH")
    return found


def simulator_command(
    job_dir: str | Path, workspace: Path, sites: Sequence[str], threads: int, env: dict[str, str] | None
) -> tuple[list[str], dict[str, str]]:
    """`nvflare simulator JOB -w WS -c SITES -t THREADS` and its environment: this one with `env` on top, and this
    interpreter's environment first on PATH (the sites' processes import our packages from it)."""
    command = [nvflare_executable(), "simulator", str(job_dir), "-w", str(workspace)]
    command += ["-c", ",".join(sites), "-t", str(threads)]
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return command, full_env


def run_simulator(
    job_dir: str | Path,
    workspace: str | Path,
    sites: Sequence[str] = SITES,
    threads: int = 2,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    log_file: str | Path | None = None,
    stall_seconds: float = STALL_SECONDS,
    progress: Callable[[str], None] | None = None,
    attempts: int = 1,
    clear_before_retry: Sequence[Path] = (),
) -> SimulatorRun:
    """`nvflare simulator JOB -w WS -c SITES -t THREADS` with extra environment, watched (`watch`); its output goes
    to `log_file` (default `<workspace>.log`). `progress` receives a line per round started. A run that does not
    complete (`SimulatorRun.problems`) is tried again in a fresh workspace (and with `clear_before_retry`, e.g. the
    sites' state folder, removed), `attempts` times in all."""
    workspace = Path(workspace).resolve()
    log_path = Path(log_file) if log_file else workspace.with_name(workspace.name + ".log")
    command, full_env = simulator_command(job_dir, workspace, sites, threads, env)
    rounds = _rounds_of(Path(job_dir))

    def on_round(latest: int) -> None:
        if progress is not None:
            progress(f"round {latest + 1}/{rounds} started")

    attempt = 1
    while True:
        start = time.monotonic()
        returncode, stopped = watch(command, full_env, log_path, workspace, stall_seconds, timeout, on_round)
        run = SimulatorRun(workspace, tuple(sites), returncode, time.monotonic() - start, stopped)
        problems = run.problems()
        if not problems or attempt >= attempts:
            return run
        if progress is not None:
            progress(f"attempt {attempt} did not complete ({problems[0]}); starting again in a fresh workspace")
        log_path.rename(log_path.with_name(f"{log_path.name}.attempt{attempt}"))
        for folder in (workspace, *clear_before_retry):
            shutil.rmtree(folder, ignore_errors=True)
        attempt += 1


def _rounds_of(job_dir: Path) -> int | str:
    """The job's round count, from its server config ("?" when it cannot be read)."""
    try:
        config = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text(encoding="utf-8"))
        return int(config["workflows"][0]["args"].get("num_rounds", 5))
    except (OSError, ValueError, KeyError, IndexError):
        return "?"
