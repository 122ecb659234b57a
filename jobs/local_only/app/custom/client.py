"""Site script NVFlare runs: med-duallora's `app.client` (installed, or shipped in custom/),
reading the job's site_config.json beside this file."""

from app.client import main

main()
