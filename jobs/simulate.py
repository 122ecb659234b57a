"""The one simulator runner: `nvflare simulator` with round and epoch progress, a stall watchdog, a port-clash
detector, retries, and a completion check from the run's artifacts (the simulator's exit code is unreliable). The
demo, the tests, `jobs/job.py simulate` and the benchmark all run jobs through it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from custom.controller import REPLICA_STARTED
from jobs.processes import stop_processes_in
from models.protocol import (
    AUDIT_FILE,
    COMM_DIR,
    GLOBAL_MODEL_DIR,
    GLOBAL_MODEL_FILE,
    NO_GLOBAL_MODEL_FILE,
    PERSONALISED_MODEL_DIR,
    PROGRESS_MARK,
    SITES,
    TEST_METRICS_FILE,
    replica_folder,
)

SIMULATOR_JOB = "simulate_job"
EPOCH_OF_LINE = re.compile(r"  epoch (\d+)/(\d+)\b")
"""`epoch E/N` in a SiteProgress.describe line."""
FINISHED_MARK = "Finished FedAvg."
ROUND_MARK = "Round "
POLL_SECONDS = 2.0
STALL_SECONDS = 240.0
"""A simulator whose output and server log stay unchanged this long is stuck (e.g. the server waiting for a site
lost to a fault nobody reported) and is stopped."""
PORT_CLASH = "port clash"
"""Starts the stop reason of a run lost to a port clash (`SimulatorRun.port_clash`). NVFlare's simulator picks a
free port for each site worker, releases it, and the worker binds it moments later: another process may take it
in between (`OSError: [Errno 98] Address already in use`), the site never starts, and the server waits for it. The
clash is transient: `run_simulator` starts such a run again."""
PORT_CLASH_SIGNATURES = ("Address already in use", "Failed to create connection to the child process")
"""Lines of the simulator's output that mean a port clash (the worker's bind error; the simulator giving up on
reaching the worker)."""
PORT_CLASH_ATTEMPTS = 2
"""How many times in all `run_simulator` runs a job whose runs are lost to port clashes."""


@dataclass
class SimulatorRun:
    """A finished (or stopped) simulator workspace and the artifacts in it."""

    workspace: Path
    sites: tuple[str, ...]
    returncode: int
    seconds: float
    stopped: str = ""
    """Why the runner stopped the simulator (port clash, stalled, timed out); empty when it ended by itself."""
    replica_seeds: tuple[int, ...] = ()
    """The job's replicas (custom.controller): each seed's outputs are in `seed<N>/` of the run folders."""

    @property
    def replicas(self) -> list[int | None]:
        """The seed of each replica, or [None] for a job of one run: what the artifact paths take."""
        return list(self.replica_seeds) or [None]

    @property
    def port_clash(self) -> bool:
        """Whether the run was lost to a port clash (transient: worth running again)."""
        return self.stopped.startswith(PORT_CLASH)

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
        """Why the run did not complete; empty when the global model, the end of training (of every replica), every
        site's test metrics and exported model, and the server's exported global model (or its note saying why
        there is none) are there for every replica, the runner did not stop it, and no log holds an error."""
        found = [self.stopped] if self.stopped else []
        if not self.global_model_path.is_file():
            found.append(f"no {GLOBAL_MODEL_FILE} on the server")
        finished = self.log().count(FINISHED_MARK)
        if finished < len(self.replicas):
            found.append(f"server log holds {finished} {FINISHED_MARK!r} for {len(self.replicas)} replica(s)")
        for seed in self.replicas:
            where = f" (replica {replica_folder(seed)})" if seed is not None else ""
            missing = [site for site in self.sites if not self.test_metrics_path(site, seed).is_file()]
            found += [f"{site}: no {TEST_METRICS_FILE}{where}" for site in missing]
            unexported = [
                site
                for site in self.sites
                if not (self.personalised_model_dir(site, seed) / "metadata.json").is_file()
            ]
            found += [f"{site}: no {PERSONALISED_MODEL_DIR}/{where}" for site in unexported]
            if (
                not (self.global_model_dir_of(seed) / "metadata.json").is_file()
                and not (self.server_dir / replica_folder(seed) / NO_GLOBAL_MODEL_FILE).is_file()
            ):
                found.append(f"no {GLOBAL_MODEL_DIR}/ (nor {NO_GLOBAL_MODEL_FILE}) on the server{where}")
        return found + self.error_lines()

    def test_metrics_path(self, site: str, seed: int | None = None) -> Path:
        """A site's final evaluation (of the replica of `seed`, in a job of several)."""
        return self.site_dir(site) / replica_folder(seed) / TEST_METRICS_FILE

    def test_metrics(self, site: str, seed: int | None = None) -> dict[str, Any]:
        return json.loads(self.test_metrics_path(site, seed).read_text(encoding="utf-8"))

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
    def global_model_dir(self) -> Path:
        """The server's exported global model (models.export format; absent for policies without one)."""
        return self.global_model_dir_of(None)

    def global_model_dir_of(self, seed: int | None) -> Path:
        """The exported global model of the replica of `seed` (None: the job's one run)."""
        return self.server_dir / replica_folder(seed) / GLOBAL_MODEL_DIR

    def personalised_model_dir(self, site: str, seed: int | None = None) -> Path:
        """A site's exported personalised model (models.export format; of the replica of `seed`)."""
        return self.site_dir(site) / replica_folder(seed) / PERSONALISED_MODEL_DIR

    @property
    def global_model_path(self) -> Path:
        return self.server_dir / "app_server" / GLOBAL_MODEL_FILE

    def global_model(self) -> dict[str, torch.Tensor]:
        saved = torch.load(self.global_model_path, map_location="cpu", weights_only=True)
        return dict(saved["model"])


def round_started(line: str) -> int | None:
    """The round (0-based) a server log line says started, None for any other line."""
    position = line.find(ROUND_MARK)
    if position < 0 or not line.rstrip(" -").endswith("started."):
        return None
    number = line[position + len(ROUND_MARK) :].split(" ", 1)[0]
    return int(number) if number.isdigit() else None


def latest_round(server_log: Path) -> int | None:
    """The last round the server log says it started (0-based), None before the first."""
    if not server_log.is_file():
        return None
    started = [round_started(line) for line in server_log.read_text(encoding="utf-8", errors="replace").splitlines()]
    return max((number for number in started if number is not None), default=None)


@dataclass(frozen=True)
class SiteProgress:
    """One training epoch of a site, from the PROGRESS_MARK line the site prints after it."""

    site: str
    round: int
    """NVFlare's round number (0-based)."""
    epoch: int
    """The epoch just finished (1-based), of `epochs`."""
    epochs: int
    train_loss: float | None = None
    seed: int | None = None
    """The replica's seed in a job of several replicas (custom.controller), else None."""

    def describe(self, rounds: int | str) -> str:
        """`round 3/5  ge  epoch 3/20  train_loss 0.531` (rounds 1-based, as the round lines), after `seed 1  ` in
        a job of several replicas."""
        line = f"round {self.round + 1}/{rounds}  {self.site}  epoch {self.epoch}/{self.epochs}"
        if self.seed is not None:
            line = f"seed {self.seed}  {line}"
        return line if self.train_loss is None else f"{line}  train_loss {self.train_loss:.3f}"


def parse_progress(line: str) -> SiteProgress | None:
    """The SiteProgress of a line holding PROGRESS_MARK (after any log prefix; `key=value` fields other than
    site, round, epoch=E/N, train_loss and seed are ignored); None for any other line or a malformed one."""
    _, mark, rest = line.partition(PROGRESS_MARK)
    if not mark:
        return None
    fields = dict(token.split("=", 1) for token in rest.split() if "=" in token)
    try:
        epoch, _, epochs = fields["epoch"].partition("/")
        loss = fields.get("train_loss")
        seed = int(fields["seed"]) if "seed" in fields else None
        return SiteProgress(
            fields["site"], int(fields["round"]), int(epoch), int(epochs), None if loss is None else float(loss), seed
        )
    except (KeyError, ValueError):
        return None


class LogTail:
    """Follows a growing log file: each call reads only the bytes added since the last one."""

    def __init__(self, path: Path, skip_existing: bool = False):
        """`skip_existing`: ignore what the file holds now (a previous run's log, about to be replaced)."""
        self.path = path
        self.offset = 0
        self._identity: tuple[int, int] | None = None
        self._partial = b""
        if skip_existing and path.is_file():
            status = path.stat()
            self.offset, self._identity = status.st_size, (status.st_dev, status.st_ino)

    def new_lines(self, final: bool = False) -> list[str]:
        """The complete lines added since the last call (and, when `final`, an unfinished last line); the file is
        read again from its start when it was replaced or truncated."""
        try:
            with open(self.path, "rb") as handle:
                status = os.fstat(handle.fileno())
                if (status.st_dev, status.st_ino) != self._identity or status.st_size < self.offset:
                    self.offset, self._identity, self._partial = 0, (status.st_dev, status.st_ino), b""
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            data = b""
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.decode("utf-8", errors="replace") for line in lines]


class RunMonitor:
    """What `watch` reads from a running simulator: rounds from the server log, the sites' epochs (one report per
    site, round and epoch) and port clashes from the simulator's output."""

    def __init__(
        self,
        log_path: Path,
        workspace: Path,
        on_round: Callable[[int], None] | None = None,
        on_progress: Callable[[SiteProgress], None] | None = None,
    ):
        self.output = LogTail(log_path)
        self.server_log = LogTail(workspace / "server" / "log.txt", skip_existing=True)
        self.on_round = on_round
        self.on_progress = on_progress
        self.port_clash_line = ""
        self._round = -1
        self._epochs: set[tuple[str, int, int, int | None]] = set()

    def read(self, final: bool = False) -> bool:
        """Read what both logs gained and report it; whether they grew."""
        before = (self.output.offset, self.server_log.offset)
        for line in self.output.new_lines(final):
            self._output_line(line)
        for line in self.server_log.new_lines(final):
            self._server_line(line)
        return (self.output.offset, self.server_log.offset) != before

    def _output_line(self, line: str) -> None:
        if not self.port_clash_line and any(signature in line for signature in PORT_CLASH_SIGNATURES):
            self.port_clash_line = line.strip()
        progress = parse_progress(line)
        key = None if progress is None else (progress.site, progress.round, progress.epoch, progress.seed)
        if key is None or key in self._epochs:
            return
        self._epochs.add(key)
        if self.on_progress is not None:
            self.on_progress(progress)

    def _server_line(self, line: str) -> None:
        if REPLICA_STARTED in line:  # the next replica counts its rounds from its start round again
            self._round = -1
        started = round_started(line)
        if started is not None and started > self._round:
            self._round = started
            if self.on_round is not None:
                self.on_round(started)


def watch(
    command: Sequence[str],
    env: dict[str, str],
    log_path: Path,
    workspace: Path,
    stall_seconds: float = STALL_SECONDS,
    timeout: float | None = None,
    on_round: Callable[[int], None] | None = None,
    on_progress: Callable[[SiteProgress], None] | None = None,
) -> tuple[int, str]:
    """Run `command` with its output in `log_path`, calling `on_round(r)` when the server starts round r and
    `on_progress` once per site, round and epoch the sites report. Both logs are read as they grow, never again.

    Returns (exit code, why it was stopped or ""). A run whose output shows a port clash is stopped at once (the
    reason starts with PORT_CLASH); one whose output and server log stay unchanged for `stall_seconds`, or that
    outlives `timeout`, is stopped too, always with every process working in `workspace`.
    """
    monitor = RunMonitor(log_path, workspace, on_round, on_progress)
    start = last_change = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            if monitor.read():
                last_change = time.monotonic()
            reason = _stop_reason(monitor, log_path, start, last_change, stall_seconds, timeout)
            if reason:
                _stop(process, workspace)
                return process.returncode, reason
    monitor.read(final=True)
    return process.returncode, _port_clash_reason(monitor, log_path)


def _stop_reason(
    monitor: RunMonitor, log_path: Path, start: float, last_change: float, stall_seconds: float, timeout: float | None
) -> str:
    """Why a running simulator must be stopped now (port clash, stall, timeout), or ""."""
    now = time.monotonic()
    if monitor.port_clash_line:
        return _port_clash_reason(monitor, log_path)
    if now - last_change > stall_seconds:
        return f"the simulator made no progress for {stall_seconds:.0f} s; see {log_path}"
    if timeout is not None and now - start > timeout:
        return f"the simulator ran past {timeout:.0f} s; see {log_path}"
    return ""


def _port_clash_reason(monitor: RunMonitor, log_path: Path) -> str:
    """The stop reason of a port clash the output showed ("" when it showed none)."""
    if not monitor.port_clash_line:
        return ""
    return (
        f"{PORT_CLASH}: a site worker could not take the port NVFlare picked for it (another process took it "
        f"first): {monitor.port_clash_line[:200]!r}; see {log_path}"
    )


def _stop(process: subprocess.Popen, workspace: Path) -> None:
    """Kill the simulator and end every process working in its workspace."""
    process.kill()
    process.wait()
    stop_processes_in(workspace)


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
    """`nvflare simulator JOB -w WS -c SITES -t THREADS` and its environment: this one with `env` on top, this
    interpreter's environment first on PATH (the sites' processes import our packages from it), and unbuffered
    Python output unless the environment says otherwise."""
    command = [nvflare_executable(), "simulator", str(job_dir), "-w", str(workspace)]
    command += ["-c", ",".join(sites), "-t", str(threads)]
    full_env = {"PYTHONUNBUFFERED": "1", **os.environ, **(env or {})}  # sites' lines reach the output as printed
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return command, full_env


def last_epochs_only(say: Callable[[str], None]) -> Callable[[str], None]:
    """A `run_simulator` progress callback passing every line but the epoch lines, of which only each site's last
    epoch of a round (the demo and the benchmark: a line per site and round, not per epoch)."""

    def filtered(line: str) -> None:
        epoch = EPOCH_OF_LINE.search(line)
        if epoch is None or epoch.group(1) == epoch.group(2):
            say(line)

    return filtered


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
    port_clash_attempts: int = PORT_CLASH_ATTEMPTS,
) -> SimulatorRun:
    """`nvflare simulator JOB -w WS -c SITES -t THREADS` with extra environment, watched (`watch`); its output goes
    to `log_file` (default `<workspace>.log`). `progress` receives a line per round started and one per site and
    training epoch (`SiteProgress.describe`), and a line for each retry.

    A run that does not complete (`SimulatorRun.problems`) is tried again in a fresh workspace, with
    `clear_before_retry` (e.g. the sites' state folder) removed and the failed attempt's output kept as
    `<log_file>.attemptN`: up to `port_clash_attempts` times in all when it was lost to a port clash (transient),
    `attempts` times in all otherwise (default 1: no retry).
    """
    workspace = Path(workspace).resolve()
    log_path = Path(log_file) if log_file else workspace.with_name(workspace.name + ".log")
    command, full_env = simulator_command(job_dir, workspace, sites, threads, env)
    rounds = _rounds_of(Path(job_dir))
    replica_seeds = _replica_seeds_of(Path(job_dir))
    say = progress or (lambda line: None)

    def on_round(latest: int) -> None:
        say(f"round {latest + 1}/{rounds} started")

    def on_progress(site_progress: SiteProgress) -> None:
        say(site_progress.describe(rounds))

    attempt = 1
    while True:
        start = time.monotonic()
        returncode, stopped = watch(
            command, full_env, log_path, workspace, stall_seconds, timeout, on_round, on_progress
        )
        run = SimulatorRun(workspace, tuple(sites), returncode, time.monotonic() - start, stopped, replica_seeds)
        problems = run.problems()
        allowed = max(attempts, port_clash_attempts) if run.port_clash else attempts
        if not problems or attempt >= allowed:
            return run
        say(f"attempt {attempt} did not complete ({problems[0]}); starting again in a fresh workspace")
        log_path.rename(log_path.with_name(f"{log_path.name}.attempt{attempt}"))
        for folder in (workspace, *clear_before_retry):
            shutil.rmtree(folder, ignore_errors=True)
        attempt += 1


def _controller_arguments(job_dir: Path) -> dict[str, Any]:
    """The arguments of the job's server workflow, from its server config (empty when it cannot be read)."""
    try:
        server_config = next(job_dir.glob("app*/config/config_fed_server.json"))
        return dict(json.loads(server_config.read_text(encoding="utf-8"))["workflows"][0]["args"])
    except (StopIteration, OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def _rounds_of(job_dir: Path) -> int | str:
    """The job's last round, 1-based: its start round plus its round count ("?" when it cannot be read)."""
    arguments = _controller_arguments(job_dir)
    try:
        return int(arguments.get("start_round", 0)) + int(arguments.get("num_rounds", 5)) if arguments else "?"
    except (TypeError, ValueError):
        return "?"


def _replica_seeds_of(job_dir: Path) -> tuple[int, ...]:
    """The job's replica seeds (custom.controller), empty for a job of one run."""
    return tuple(int(seed) for seed in _controller_arguments(job_dir).get("replica_seeds", []))
