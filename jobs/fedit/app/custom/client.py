"""Site script NVFlare runs: med-duallora's `app.client` (installed, or shipped in custom/)."""

from app.client import main

main()
