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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from nvflare.fuel.flare_api.flare_api import new_secure_session

from jobs.privacy import install_site_privacy, install_site_security
from jobs.processes import ListeningSockets, processes_in, stop_processes_in, wait_until_gone
from jobs.simulate import SimulatorRun
from jobs.site_installed import is_site_installed, job_site_config
from models.policy import SharingPolicy
from models.protocol import DATA_ENV, SITES

PROJECT_NAME = "med_duallora_poc"
ADMIN = "admin@nvidia.com"
COORDINATOR = "coordinator"
"""The server's and the admin's organisation; each site is an organisation of its own, as in production."""
SERVER_HOST = "127.0.0.1"
COMPLETED = "FINISHED:COMPLETED"
FAILED_TO_RUN = "FINISHED:FAILED_TO_RUN"
"""The status of a job that no site would deploy (e.g. custom code a site's authorization refuses)."""
SECURE_AGGREGATOR = "custom.secure_aggregation.EncryptedSharedKeyAggregator"
"""The server component of a job with secure aggregation (named, not imported: tenseal is an optional extra)."""
CONNECT_TIMEOUT_S = 10.0
"""How long a submission tries to reach the server (NVFlare's default for a Flare API session)."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((SERVER_HOST, 0))
        return probe.getsockname()[1]


def loopback_project(sites: Sequence[str], port: int, homomorphic_encryption: bool = False) -> dict:
    """A project.yml whose server is 127.0.0.1 (bound to loopback) on `port`; admin traffic shares the port. The
    server and the admin belong to the coordinator, each site to its own hospital (as `jobs/production`).
    `homomorphic_encryption`: NVFlare's HEBuilder also writes the CKKS contexts of secure aggregation into the
    kits, before SignatureBuilder signs them (an unsigned context is refused in secure mode)."""
    participants = [{"name": SERVER_HOST, "type": "server", "org": COORDINATOR, "fed_learn_port": port}]
    participants += [{"name": site, "type": "client", "org": f"hospital_{site}"} for site in sites]
    participants.append({"name": ADMIN, "type": "admin", "org": COORDINATOR, "role": "project_admin"})
    impl = "nvflare.lighter.impl"
    builders = [
        {"path": f"{impl}.workspace.WorkspaceBuilder", "args": {"template_file": ["master_template.yml"]}},
        {"path": f"{impl}.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        {"path": f"{impl}.cert.CertBuilder"},
        *([{"path": f"{impl}.he.HEBuilder"}] if homomorphic_encryption else []),
        {"path": f"{impl}.signature.SignatureBuilder"},
    ]
    return {
        "api_version": 3,
        "name": PROJECT_NAME,
        "description": "med-duallora POC on loopback",
        "participants": participants,
        "builders": builders,
    }


@dataclass
class PocRun(SimulatorRun):
    """A finished POC job, read like a simulator workspace (SimulatorRun's artifacts and checks): the server's run
    folder as downloaded, each site's run folder in its kit."""

    server_folder: Path = Path()
    site_folders: dict[str, Path] = field(default_factory=dict)

    @property
    def server_dir(self) -> Path:
        return self.server_folder

    def site_dir(self, site: str) -> Path:
        return self.site_folders[site]

    @classmethod
    def of(cls, result: dict, workspace: Path, seconds: float = 0.0, replica_seeds: Sequence[int] = ()) -> PocRun:
        """The run of `PocNetwork.run`'s record (also what `python -m jobs.poc` prints)."""
        if result["server"] is None:
            raise RuntimeError(f"job {result['job_id']} never started on the POC network ({result['status']})")
        return cls(
            workspace=Path(workspace),
            sites=tuple(result["sites"]),
            returncode=0 if result["status"] == COMPLETED else 1,
            seconds=seconds,
            stopped="" if result["status"] == COMPLETED else f"the job ended {result['status']}",
            replica_seeds=tuple(replica_seeds),
            server_folder=Path(result["server"]),
            site_folders={site: Path(folder) for site, folder in result["sites"].items()},
        )

    def log(self, participant: str = "server") -> str:
        folder = self.server_dir if participant == "server" else self.site_dir(participant)
        path = folder / "log.txt"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


class JobFailed(RuntimeError):
    """`nvflare job wait` saw the job end in a failed state (`status`)."""

    def __init__(self, status: str):
        super().__init__(f"the job ended {status}")
        self.status = status


@dataclass(frozen=True)
class AdminKit:
    """An admin startup kit: whose it is and which server it reaches (`startup/fed_admin.json`, the CN of
    `startup/client.crt`)."""

    folder: Path
    username: str
    certificate_name: str
    host: str
    port: int | str

    @classmethod
    def read(cls, folder: str | Path) -> AdminKit:
        """The kit in `folder`; FileNotFoundError when it holds no admin startup kit."""
        folder = Path(folder).resolve()
        config_file, certificate_file = folder / "startup" / "fed_admin.json", folder / "startup" / "client.crt"
        for path in (config_file, certificate_file):
            if not path.is_file():
                raise FileNotFoundError(f"{folder} is not an admin startup kit: no startup/{path.name}")
        admin = json.loads(config_file.read_text(encoding="utf-8")).get("admin", {})
        certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cls(
            folder=folder,
            username=str(admin.get("username", "")),
            certificate_name=str(names[0].value) if names else "",
            host=str(admin.get("host", "?")),
            port=admin.get("port", admin.get("admin_port", "?")),
        )

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    def check_user(self, username: str) -> None:
        """ValueError (one line naming both) unless `username` is the kit's admin, by its configuration and its
        certificate."""
        if username == self.certificate_name and self.username in ("", username):
            return
        if self.username and self.username != self.certificate_name:
            owner = f"fed_admin.json says {self.username!r} and client.crt {self.certificate_name!r}"
        else:
            owner = f"which is {self.certificate_name!r} (startup/fed_admin.json, the CN of startup/client.crt)"
        raise ValueError(f"--username {username!r} does not match the startup kit {self.folder}, {owner}")


def submit_folder(
    job_dir: str | Path, startup_kit: str | Path, username: str, timeout: float = CONNECT_TIMEOUT_S
) -> str:
    """Submit an exported job folder through an admin startup kit (NVFlare's Flare API session, which gives up
    reaching the server after `timeout` seconds with NoConnection, a ConnectionError); the job id."""
    session = new_secure_session(username, str(startup_kit), timeout=timeout)
    try:
        return session.submit_job(str(Path(job_dir).resolve()))
    finally:
        session.close()


class PocNetwork:
    """A POC network in `workspace`, used as a context manager that always stops what it started."""

    def __init__(
        self,
        workspace: str | Path,
        sites: Sequence[str] = SITES,
        port: int | None = None,
        env: dict[str, str] | None = None,
        site_policy: SharingPolicy | None = None,
        site_authorization: bool = False,
        homomorphic_encryption: bool = False,
    ):
        """`site_policy`: when given, each site gets its own privacy scope (jobs.privacy) allowing at most what
        this policy shares, applied to every job whatever the job's own filters. `site_authorization`: each site
        also keeps custom code and shell commands to its own staff (jobs.privacy.install_site_security), so that
        only site-installed jobs run there. `homomorphic_encryption`: the kits carry the CKKS contexts that jobs
        with secure aggregation need."""
        if site_authorization and site_policy is None:
            raise ValueError("site_authorization needs the site_policy of the privacy scope installed with it")
        self.site_policy = site_policy
        self.site_authorization = site_authorization
        self.homomorphic_encryption = homomorphic_encryption
        self.listening: set[tuple[str, int]] = set()
        self._sockets: ListeningSockets | None = None
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
        project_file.write_text(
            yaml.safe_dump(loopback_project(self.sites, self.port, self.homomorphic_encryption), sort_keys=False)
        )
        self._nvflare("poc", "prepare", "-i", str(project_file), "--force")
        install = install_site_security if self.site_authorization else install_site_privacy
        if self.site_policy is not None:
            for site in self.sites:
                install(self.prod_dir / site / "local", self.site_policy)
        self._sockets = ListeningSockets(self.poc_dir)
        try:
            self._nvflare("poc", "start", timeout=300)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def submit(self, job_dir: str | Path) -> str:
        """Submit as the admin, the way `jobs/job.py submit` does on a provisioned network; the job id."""
        return submit_folder(job_dir, self.prod_dir / ADMIN, ADMIN)

    def wait(self, job_id: str, timeout: int) -> str:
        """The job's final status (`FINISHED:COMPLETED` when it ran through, FAILED_TO_RUN when no site would
        deploy it)."""
        try:
            return self._json("job", "wait", job_id, "--timeout", str(timeout), timeout=timeout + 60)["status"]
        except JobFailed as failed:
            return failed.status

    def download(self, job_id: str) -> Path:
        """The server's run folder of the job, downloaded to `<workspace>/results/<job_id>/workspace`."""
        path = self._json("job", "download", job_id, "-o", str(self.workspace / "results"))["path"]
        return Path(path) / "workspace"

    def run(self, job_dir: str | Path, timeout: int) -> dict:
        """Submit, wait, download: the job's id, final status, server folder (None when the job never started), site
        run folders and the port."""
        return self.follow(self.submit(job_dir), timeout)

    def run_artifacts(self, job_dir: str | Path, timeout: int, replica_seeds: Sequence[int] = ()) -> PocRun:
        """`run`, read as a PocRun: `seconds` counts from submission to the end of the job."""
        started = time.monotonic()
        result = self.run(job_dir, timeout)
        return PocRun.of(result, self.workspace, time.monotonic() - started, replica_seeds)

    def follow(self, job_id: str, timeout: int) -> dict:
        """Wait for a submitted job and download its results (`run`'s record)."""
        status = self.wait(job_id, timeout)
        server_dir = None if status == FAILED_TO_RUN else str(self.download(job_id))
        sites = {site: str(self.site_run_dir(site, job_id)) for site in self.sites}
        return {"job_id": job_id, "status": status, "server": server_dir, "sites": sites, "port": self.port}

    def server_log(self) -> str:
        """The server's own log (deployment failures land here, not in a job's folder)."""
        return (self.prod_dir / SERVER_HOST / "log.txt").read_text(encoding="utf-8", errors="replace")

    def site_run_dir(self, site: str, job_id: str) -> Path:
        return self.prod_dir / site / job_id

    def shell_cat(self, target: str, file: str) -> str:
        """`cat` of a file in `target`'s workspace as the admin (an NVFlare shell command, subject to the
        target's authorization); NVFlare's reply text."""
        session = new_secure_session(ADMIN, str(self.prod_dir / ADMIN))
        try:
            return session.cat_target(target, file=file)
        finally:
            session.close()

    def stop(self) -> None:
        """Ask the network to shut down, then end every process still running from this workspace; what listened
        while it ran is left in `listening`."""
        try:
            self._nvflare("poc", "stop", timeout=120)
        except (subprocess.SubprocessError, OSError) as error:
            print(f"poc stop failed ({error}); ending the processes directly", file=sys.stderr)
        wait_until_gone(self.poc_dir, timeout_seconds=30)
        stop_processes_in(self.poc_dir)
        if self._sockets is not None:
            self.listening = self._sockets.stop()

    def running_pids(self) -> list[int]:
        """Processes whose command line names this POC workspace (start scripts, server, clients, jobs)."""
        return [process.pid for process in processes_in(self.poc_dir)]

    def _nvflare(self, *args: str, timeout: int = 600) -> str:
        command = ["nvflare", *args]
        done = subprocess.run(
            command, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        reply = done.stdout.strip().splitlines()[-1:] if "--format" in args else []
        if done.returncode != 0 and reply and '"JOB_FAILED"' in reply[0]:
            raise JobFailed(json.loads(reply[0]).get("data", {}).get("status", "FAILED"))
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def _json(self, *args: str, timeout: int = 600) -> dict:
        output = self._nvflare("--format", "json", *args, timeout=timeout)
        reply = json.loads(output.strip().splitlines()[-1])
        if reply.get("status") != "ok":
            raise RuntimeError(f"nvflare {' '.join(args)}: {reply}")
        return reply["data"]


def run_job(
    job_dir: str | Path,
    workspace: str | Path,
    data_root: str,
    timeout: int = 900,
    port: int | None = None,
) -> dict:
    """Run one job on a fresh loopback POC network whose sites carry the privacy scope of the job's policy and, for
    a site-installed job, are locked down as production sites would be (`PocNetwork(site_authorization=True)`);
    `PocNetwork.run`'s record."""
    env = {DATA_ENV: str(Path(data_root).resolve())}
    policy, locked_down = job_site_config(job_dir).policy, is_site_installed(job_dir)
    network = PocNetwork(
        workspace,
        port=port,
        env=env,
        site_policy=policy,
        site_authorization=locked_down,
        homomorphic_encryption=uses_secure_aggregation(job_dir),
    )
    with network:
        return network.run(job_dir, timeout)


def uses_secure_aggregation(job_dir: str | Path) -> bool:
    """Whether an exported job aggregates under homomorphic encryption (its server builds the encrypted aggregator)."""
    configs = Path(job_dir).glob("*/config/config_fed_server.json")
    return any(SECURE_AGGREGATOR in config.read_text(encoding="utf-8") for config in configs)


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
    return 0 if result["status"] == COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
