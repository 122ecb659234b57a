"""A site's own privacy scope (NVFlare `local/privacy.json`): the result filter applies whatever the job says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.atomic_io import write_json_atomic
from models.policy import SharingPolicy

SCOPE_NAME = "med_duallora_site"
PRIVACY_FILE = "privacy.json"


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
