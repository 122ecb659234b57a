"""The executor of a site-installed job: NVFlare's Client API executor whose site process is always the installed
`app.client`, whatever the job says. A job-chosen command would be custom code in disguise, so the site allows this
class and not NVFlare's general one (jobs.privacy)."""

from __future__ import annotations

import sys

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.client.config import ExchangeFormat

SITE_CONFIG_PATH = "config/site_config.json"
"""The site configuration inside the site's app folder, where the site process starts."""


def site_command() -> list[str]:
    """The site process: the installed `app.client` under this site's own interpreter."""
    return [sys.executable, "-u", "-m", "app.client", "--config", SITE_CONFIG_PATH]


class SiteInstalledExecutor(ClientAPIExecutor):
    """Runs `site_command()` in a process of its own, once per job or once per task (`launch_once`); the job can
    set nothing else."""

    def __init__(self, launch_once: bool = True):
        super().__init__(
            execution_mode="external_process",
            command=site_command(),
            launch_once=launch_once,
            params_exchange_format=ExchangeFormat.PYTORCH,
            server_expected_format=ExchangeFormat.PYTORCH,
        )
