"""Run `nvflare simulator` on a job folder and judge the run by its artifacts (its exit code is unreliable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.client import TEST_METRICS_FILE
from custom.aggregators import AUDIT_FILE
from custom.comm import COMM_DIR
from jobs.recipe import SITES

SIMULATOR_JOB = "simulate_job"
FINISHED_MARK = "Finished FedAvg."


@dataclass
class SimulatorRun:
    """A finished simulator workspace and the artifacts in it."""

    workspace: Path
    sites: tuple[str, ...]
    returncode: int
    seconds: float

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
        test metrics are there and no log holds an error."""
        found = []
        if not self.global_model_path.is_file():
            found.append("no FL_global_model.pt on the server")
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
        return self.server_dir / "app_server" / "FL_global_model.pt"

    def global_model(self) -> dict[str, torch.Tensor]:
        saved = torch.load(self.global_model_path, map_location="cpu", weights_only=True)
        return dict(saved["model"])


def run_simulator(
    job_dir: str | Path,
    workspace: str | Path,
    sites: tuple[str, ...] = SITES,
    threads: int = 2,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    log_file: str | Path | None = None,
) -> SimulatorRun:
    """`nvflare simulator JOB -w WS -c SITES -t THREADS` with extra environment; its output goes to `log_file`."""
    workspace = Path(workspace).resolve()
    command = ["nvflare", "simulator", str(job_dir), "-w", str(workspace), "-c", ",".join(sites), "-t", str(threads)]
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    start = time.monotonic()
    with open(log_file or os.devnull, "w", encoding="utf-8") as output:
        done = subprocess.run(command, env=full_env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout)
    return SimulatorRun(workspace, tuple(sites), done.returncode, time.monotonic() - start)
