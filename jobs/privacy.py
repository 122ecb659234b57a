"""A site's own security settings, in its startup kit's `local/` folder, whatever the job says: the privacy scope
(`privacy.json`), who may run custom code or shell commands there (`authorization.json`) and which classes a job
without custom code may build (`resources.json`).

    python -m jobs.privacy --kit <startup kit of a site> [--method med_duallora]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.atomic_io import write_json_atomic
from models.policy import POLICY_NAMES, SharingPolicy, get_policy

SCOPE_NAME = "med_duallora_site"
PRIVACY_FILE = "privacy.json"
AUTHORIZATION_FILE = "authorization.json"
RESOURCES_FILE = "resources.json"
SITE_ONLY = "o:site"
"""An NVFlare authorization condition: the user belongs to the site's own organisation."""
SITE_INSTALLED_CLASSES = (
    "custom.site_executor.SiteInstalledExecutor",
    "custom.filters.SharedKeysOnly",
    "custom.codec.CompressWeights",
    "custom.codec.DecompressWeights",
    "custom.secure_aggregation.EncryptSharedWeights",
    "custom.secure_aggregation.DecryptSharedWeights",
)
"""What a site-installed job (jobs.site_installed) builds at a site beyond NVFlare's default allow list."""


def site_privacy_policy(policy: SharingPolicy) -> dict[str, Any]:
    """The content of a site's `local/privacy.json`: one scope, the default, whose result filter is
    `SharedKeysOnly` for `policy` (the most the site lets leave), applied by NVFlare to every task's result.

    A job that names no scope gets this one; a job naming another scope is refused at deployment, because the
    site defines no other.
    """
    return {
        "scopes": [
            {
                "name": SCOPE_NAME,
                "properties": {},
                "task_result_filters": [
                    {"path": "custom.filters.SharedKeysOnly", "args": {"policy": policy.to_dict()}}
                ],
            }
        ],
        "default_scope": SCOPE_NAME,
    }


def install_site_privacy(site_local_dir: str | Path, policy: SharingPolicy) -> Path:
    """Write the site's privacy scope into its startup kit's `local/` folder (atomically); returns its path."""
    path = Path(site_local_dir) / PRIVACY_FILE
    write_json_atomic(path, site_privacy_policy(policy))
    return path


def site_authorization() -> dict[str, Any]:
    """The content of a site's `local/authorization.json`: custom code (BYOC) and shell commands only for users of
    the site's own organisation, whatever their role; otherwise NVFlare's default rights.

    The coordinator's admins still submit, watch and abort jobs, but a job carrying code runs at the site only
    when the site's own staff submitted it: the federation's jobs are site-installed (jobs.site_installed).
    """
    own_jobs = "n:submitter"
    return {
        "format_version": "1.0",
        "permissions": {
            "project_admin": {
                "submit_job": "any",
                "clone_job": "any",
                "manage_job": "any",
                "download_job": "any",
                "view": "any",
                "operate": "any",
                "shell_commands": SITE_ONLY,
                "byoc": SITE_ONLY,
            },
            "org_admin": {
                "submit_job": "none",
                "clone_job": "none",
                "manage_job": "o:submitter",
                "download_job": "o:submitter",
                "view": "any",
                "operate": SITE_ONLY,
                "shell_commands": SITE_ONLY,
                "byoc": "none",
            },
            "lead": {
                "submit_job": "any",
                "clone_job": own_jobs,
                "manage_job": own_jobs,
                "download_job": own_jobs,
                "view": "any",
                "operate": SITE_ONLY,
                "shell_commands": SITE_ONLY,
                "byoc": SITE_ONLY,
            },
            "member": {"view": "any"},
        },
    }


def site_resources(default_resources: dict[str, Any]) -> dict[str, Any]:
    """The site's `local/resources.json`: its kit's `resources.json.default` with the classes a site-installed job
    builds added to the allow list, enforced (a job without custom code builds nothing else)."""
    resources = json.loads(json.dumps(default_resources))
    allowed = list(resources.get("class_allow_list", []))
    if "*" in allowed:
        raise ValueError("the kit's class_allow_list allows every class ('*'); restore the provisioned list first")
    resources["class_allow_list"] = allowed + [name for name in SITE_INSTALLED_CLASSES if name not in allowed]
    resources["class_list_enforcement_mode"] = "enforce"
    return resources


def install_site_security(site_local_dir: str | Path, policy: SharingPolicy) -> list[Path]:
    """Write the privacy scope, the authorization and the allow list into a kit's `local/` folder; their paths."""
    local = Path(site_local_dir)
    default_resources = json.loads((local / f"{RESOURCES_FILE}.default").read_text(encoding="utf-8"))
    written = [install_site_privacy(local, policy)]
    settings = {AUTHORIZATION_FILE: site_authorization(), RESOURCES_FILE: site_resources(default_resources)}
    for name, content in settings.items():
        write_json_atomic(local / name, content)
        written.append(local / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Install a site's security settings into its startup kit."""
    parser = argparse.ArgumentParser(prog="python -m jobs.privacy", description=__doc__.splitlines()[0])
    parser.add_argument("--kit", required=True, type=Path, help="the site's startup kit (holds local/ and startup/)")
    parser.add_argument("--method", default="med_duallora", choices=POLICY_NAMES, help="the allowlist's policy")
    args = parser.parse_args(argv)
    if not (args.kit / "local").is_dir():
        parser.error(f"{args.kit}: not a startup kit (no local/ folder)")
    for path in install_site_security(args.kit / "local", get_policy(args.method)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
