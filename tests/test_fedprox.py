"""FedProx in a real simulator run: NVFlare's own (mu sent by the controller) when every trained key is shared, the
site's term over the shared keys otherwise; never both."""

from __future__ import annotations

import pytest

from jobs.recipe import FederationConfig, export_job
from models.protocol import SITES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("method", "who"),
    [("fedit", "from the server, applied by NVFlare"), ("med_duallora", "over the shared keys, applied by the site")],
)
def test_fedprox_runs_where_it_is_exact(method, who, simulate_sites, tmp_path):
    config = FederationConfig.for_method(method, rounds=1, local_epochs=1, min_clients=4, proximal_mu=0.5)
    run = simulate_sites(export_job(config, tmp_path / "jobs"), tmp_path)
    assert run.problems() == []
    for site in SITES:
        assert f"round 0: FedProx mu=0.5 {who}" in run.log(site), site
