"""A site's replica of a job of several (app.client.open_replica): its seed, data root, state and output folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.client import open_replica, replica_tag_prefix
from app.site_config import SiteConfig
from models.protocol import DATA_ENV


@pytest.mark.parametrize(
    ("data_env", "seed", "expected_root"),
    [
        ("/data/bench/prepared_seed{seed}", 3, "/data/bench/prepared_seed3"),
        ("/data/bench/prepared", 3, "/data/bench/prepared"),
        ("/data/bench/prepared_seed{seed}", None, "/data/bench/prepared_seed7"),
    ],
)
def test_a_replica_is_the_run_of_its_seed(monkeypatch, tmp_path: Path, data_env: str, seed, expected_root: str):
    monkeypatch.setenv(DATA_ENV, data_env)
    config = SiteConfig.for_method("med_duallora", seed=7, run_name="bench")
    job_dir = tmp_path / "ws" / "job1"
    replica = open_replica(config, "ge", str(job_dir), seed)
    assert replica.data_root == expected_root
    wanted_seed = 7 if seed is None else seed
    assert replica.config.seed == replica.config.adapter.init_seed == wanted_seed
    if seed is None:
        assert (
            Path(replica.run_dir) == job_dir and replica.config.run_name == "bench" and replica_tag_prefix(seed) == ""
        )
    else:
        assert Path(replica.run_dir) == job_dir / f"seed{seed}" and replica_tag_prefix(seed) == f"seed{seed}/"
        assert replica.config.run_name == f"bench.seed{seed}" and replica.state.path.endswith(f"bench.seed{seed}/ge")
    assert Path(replica.run_dir).is_dir()


def test_replicas_of_different_seeds_start_from_different_adapters(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    config = SiteConfig.for_method("med_duallora", run_name="bench")
    first, second = (open_replica(config, "ge", str(tmp_path / "job"), seed).module for seed in (1, 2))
    again = open_replica(config, "ge", str(tmp_path / "job"), 1).module
    a, b, c = (m.trainable_state_dict() for m in (first, second, again))
    lora_a = next(key for key in a if "lora_A" in key)
    assert not torch.equal(a[lora_a], b[lora_a]) and all(torch.equal(a[key], c[key]) for key in a)


def test_a_site_without_data_says_so(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(OSError, match=DATA_ENV):
        open_replica(SiteConfig(), "ge", str(tmp_path / "job"), 1)


def test_a_replica_keeps_the_frozen_prefix_features_of_the_previous_one(monkeypatch, tmp_path: Path):
    """The replicas share the backbone and the test set: the prefix cache carries over (its own version and input
    checks drop what differs; tests/test_simulator.py checks that the scores stay those of a run alone)."""
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    config = SiteConfig.for_method("med_duallora", run_name="bench")
    first = open_replica(config, "ge", str(tmp_path / "job"), 1)
    second = open_replica(config, "ge", str(tmp_path / "job"), 2, previous=first)
    assert second.module.prefix_cache is first.module.prefix_cache is not None
    alone = open_replica(config, "ge", str(tmp_path / "job"), 2)
    assert alone.module.prefix_cache is not first.module.prefix_cache
