"""The site-installed form of an exported job: the sites' app holds configuration only, no code, so that a site
whose authorization keeps BYOC to its own staff (jobs.privacy) runs it with the med-duallora it installed itself.

NVFlare treats an app with a `custom/` folder as custom code (BYOC), which the site authorizes by the submitter's
role. Here the server app keeps its `custom/` (the initial checkpoint; the server is the coordinator's) and the
sites get `app_site/`: the client configuration, `config/site_config.json`, and `SiteInstalledExecutor`, which starts
the installed `app.client` module in a process of its own and takes no command from the job.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.site_config import SITE_CONFIG_FILE, SiteConfig
from custom.site_executor import SITE_CONFIG_PATH, SiteInstalledExecutor

SERVER_APP = "app_server"
SITE_APP = "app_site"
CLIENT_CONFIG = "config_fed_client.json"
SITE_EXECUTOR = f"{SiteInstalledExecutor.__module__}.{SiteInstalledExecutor.__name__}"


def site_executor(client_config: dict[str, Any], process_per_round: bool) -> dict[str, Any]:
    """The client configuration with its one executor replaced by `SiteInstalledExecutor` (the installed
    `app.client`, once per job or once per task)."""
    config = json.loads(json.dumps(client_config))
    (entry,) = config["executors"]
    entry["executor"] = {"path": SITE_EXECUTOR, "args": {"launch_once": not process_per_round}}
    return config


def make_site_installed(
    job_dir: str | Path, sites: Sequence[str], process_per_round: bool, client_script: str
) -> None:
    """Rewrite the exported job at `job_dir` (one `app/` for every participant) in place into the server's app and a
    code-free app for `sites`; the sites' `client_script` launcher leaves with the client configuration."""
    job_dir = Path(job_dir)
    shared_app = job_dir / "app"
    server_app, site_app = job_dir / SERVER_APP, job_dir / SITE_APP
    (site_app / "config").mkdir(parents=True)
    client_config = json.loads((shared_app / "config" / CLIENT_CONFIG).read_text(encoding="utf-8"))
    rewritten = site_executor(client_config, process_per_round)
    (site_app / "config" / CLIENT_CONFIG).write_text(json.dumps(rewritten, indent=4) + "\n", encoding="utf-8")
    shutil.move(shared_app / "custom" / SITE_CONFIG_FILE, site_app / SITE_CONFIG_PATH)
    (shared_app / "config" / CLIENT_CONFIG).unlink()
    (shared_app / "custom" / client_script).unlink()
    shared_app.rename(server_app)
    meta_path = job_dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["deploy_map"] = {SERVER_APP: ["server"], SITE_APP: list(sites)}
    meta_path.write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")


def job_site_config(job_dir: str | Path) -> SiteConfig:
    """The SiteConfig an exported job gives its sites, site-installed or not."""
    candidates = [Path(job_dir) / "app" / "custom" / SITE_CONFIG_FILE, Path(job_dir) / SITE_APP / SITE_CONFIG_PATH]
    for path in candidates:
        if path.is_file():
            return SiteConfig.read(path)
    raise FileNotFoundError(f"{job_dir}: no {SITE_CONFIG_FILE} (looked at {[str(c) for c in candidates]})")


def is_site_installed(job_dir: str | Path) -> bool:
    """Whether an exported job is in the site-installed form (its sites' app carries no code)."""
    return (Path(job_dir) / SITE_APP).is_dir()
