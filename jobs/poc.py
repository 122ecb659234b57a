"""Run a job on an NVFlare POC network bound to loopback: provision, start, submit, wait, download, stop.

    MED_DUALLORA_DATA=PREPARED python jobs/poc.py --job jobs/med_duallora --workspace runs/poc

Everything stays inside the workspace: the provisioned kits, `HOME` (NVFlare writes its CLI config there), the
site workspaces and the downloaded results. The server is provisioned as `127.0.0.1` on a free non-default port,
so nothing listens on other interfaces. Every process the network started is stopped on the way out, also when
a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from app.site_config import SITE_CONFIG_FILE, SiteConfig
from jobs.privacy import install_site_privacy
from jobs.processes import processes_in, stop_processes_in, wait_until_gone
from models.policy import SharingPolicy
from models.protocol import DATA_ENV, SITES

PROJECT_NAME = "med_duallora_poc"
ADMIN = "admin@nvidia.com"
SERVER_HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((SERVER_HOST, 0))
        return probe.getsockname()[1]


def loopback_project(sites: Sequence[str], port: int) -> dict:
    """A project.yml whose server is 127.0.0.1 (bound to loopback) on `port`; admin traffic shares the port."""
    participants = [{"name": SERVER_HOST, "type": "server", "org": "poc", "fed_learn_port": port}]
    participants += [{"name": site, "type": "client", "org": "poc"} for site in sites]
    participants.append({"name": ADMIN, "type": "admin", "org": "poc", "role": "project_admin"})
    impl = "nvflare.lighter.impl"
    builders = [
        {"path": f"{impl}.workspace.WorkspaceBuilder", "args": {"template_file": ["master_template.yml"]}},
        {"path": f"{impl}.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        {"path": f"{impl}.cert.CertBuilder"},
        {"path": f"{impl}.signature.SignatureBuilder"},
    ]
    return {
        "api_version": 3,
        "name": PROJECT_NAME,
        "description": "med-duallora POC on loopback",
        "participants": participants,
        "builders": builders,
    }


class PocNetwork:
    """A POC network in `workspace`, used as a context manager that always stops what it started."""

    def __init__(
        self,
        workspace: str | Path,
        sites: Sequence[str] = SITES,
        port: int | None = None,
        env: dict[str, str] | None = None,
        site_policy: SharingPolicy | None = None,
    ):
        """`site_policy`: when given, each site gets its own privacy scope (jobs.privacy) allowing at most what
        this policy shares, applied to every job whatever the job's own filters."""
        self.site_policy = site_policy
        self.workspace = Path(workspace).resolve()
        self.sites = list(sites)
        self.port = port or free_port()
        self.poc_dir = self.workspace / "poc"
        self.prod_dir = self.poc_dir / PROJECT_NAME / "prod_00"
        home = self.workspace / "home"
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, **(env or {}), "HOME": str(home), "NVFLARE_POC_WORKSPACE": str(self.poc_dir)}
        self.env["PATH"] = f"{venv_bin}{os.pathsep}{self.env.get('PATH', '')}"

    def __enter__(self) -> PocNetwork:
        (self.workspace / "home").mkdir(parents=True, exist_ok=True)
        project_file = self.workspace / "project.yml"
        project_file.write_text(yaml.safe_dump(loopback_project(self.sites, self.port), sort_keys=False))
        self._nvflare("poc", "prepare", "-i", str(project_file), "--force")
        if self.site_policy is not None:
            for site in self.sites:
                install_site_privacy(self.prod_dir / site / "local", self.site_policy)
        try:
            self._nvflare("poc", "start", timeout=300)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def submit(self, job_dir: str | Path) -> str:
        return self._json("job", "submit", "-j", str(Path(job_dir).resolve()))["job_id"]

    def wait(self, job_id: str, timeout: int) -> str:
        """The job's final status (`FINISHED:COMPLETED` when it ran through)."""
        return self._json("job", "wait", job_id, "--timeout", str(timeout), timeout=timeout + 60)["status"]

    def download(self, job_id: str) -> Path:
        """The server's run folder of the job, downloaded to `<workspace>/results/<job_id>/workspace`."""
        path = self._json("job", "download", job_id, "-o", str(self.workspace / "results"))["path"]
        return Path(path) / "workspace"

    def site_run_dir(self, site: str, job_id: str) -> Path:
        return self.prod_dir / site / job_id

    def stop(self) -> None:
        """Ask the network to shut down, then end every process still running from this workspace."""
        try:
            self._nvflare("poc", "stop", timeout=120)
        except (subprocess.SubprocessError, OSError) as error:
            print(f"poc stop failed ({error}); ending the processes directly", file=sys.stderr)
        wait_until_gone(self.poc_dir, timeout_seconds=30)
        stop_processes_in(self.poc_dir)

    def running_pids(self) -> list[int]:
        """Processes whose command line names this POC workspace (start scripts, server, clients, jobs)."""
        return [process.pid for process in processes_in(self.poc_dir)]

    def _nvflare(self, *args: str, timeout: int = 600) -> str:
        command = ["nvflare", *args]
        done = subprocess.run(
            command, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def _json(self, *args: str, timeout: int = 600) -> dict:
        output = self._nvflare("--format", "json", *args, timeout=timeout)
        reply = json.loads(output.strip().splitlines()[-1])
        if reply.get("status") != "ok":
            raise RuntimeError(f"nvflare {' '.join(args)}: {reply}")
        return reply["data"]


def run_jobs(
    job_dirs: Sequence[str | Path],
    workspace: str | Path,
    data_root: str,
    timeout: int = 900,
    port: int | None = None,
    site_policy: SharingPolicy | None = None,
) -> list[dict]:
    """Run jobs one after the other on one fresh loopback POC network, each site in its own privacy scope
    (`site_policy`, default: the first job's policy); per job, its id, status and result folders."""
    if site_policy is None:
        site_policy = SiteConfig.read(Path(job_dirs[0]) / "app" / "custom" / SITE_CONFIG_FILE).policy
    env = {DATA_ENV: str(Path(data_root).resolve())}
    results = []
    with PocNetwork(workspace, port=port, env=env, site_policy=site_policy) as network:
        for job_dir in job_dirs:
            job_id = network.submit(job_dir)
            status = network.wait(job_id, timeout)
            server_dir = network.download(job_id)
            sites = {site: str(network.site_run_dir(site, job_id)) for site in network.sites}
            results.append(
                {"job_id": job_id, "status": status, "server": str(server_dir), "sites": sites, "port": network.port}
            )
    return results


def run_job(job_dir: str | Path, workspace: str | Path, data_root: str, timeout: int = 900, port=None) -> dict:
    """Run one job on a fresh loopback POC network (`run_jobs`)."""
    return run_jobs([job_dir], workspace, data_root, timeout, port)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/med_duallora", help="exported job folder")
    parser.add_argument("--workspace", default="runs/poc", help="everything the POC run writes goes here")
    parser.add_argument("--data", default=os.environ.get(DATA_ENV), help="prepared data root")
    parser.add_argument("--port", type=int, default=None, help="server port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds to wait for the job")
    args = parser.parse_args(argv)
    if not args.data:
        parser.error(f"give --data or set {DATA_ENV} to a prepared data root")
    result = run_job(args.job, args.workspace, args.data, args.timeout, args.port)
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
