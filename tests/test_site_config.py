"""SiteConfig: one object for every site setting, serialised once into the job and read back exactly."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from app.site_config import SCHEMA, SiteConfig, add_site_arguments, site_config_from_arguments
from models.dual_lora import DualLoRAConfig
from models.policy import POLICY_NAMES, get_policy


@pytest.mark.parametrize("method", POLICY_NAMES)
def test_the_configuration_round_trips_through_json(method, tmp_path):
    config = SiteConfig.for_method(method, lr=3e-4, seed=7, adapter=DualLoRAConfig(global_r=4, blocks=[-1]))
    path = tmp_path / "site_config.json"
    path.write_text(config.to_json())
    assert SiteConfig.read(path) == config
    written = json.loads(path.read_text())
    assert next(iter(written)) == "schema" and written["schema"] == SCHEMA  # a scalar first (nvflare job submit)


def test_the_policy_is_built_once_for_the_model_it_describes():
    full = SiteConfig.for_method(
        "fedavg_full", weights="random", backbone="micro", adapter=DualLoRAConfig(blocks=[-1])
    )
    assert full.policy.full_blocks == (3,)  # micro has 4 blocks: the last is block 3
    assert SiteConfig.for_method("med_duallora", share_head=False).policy == get_policy("med_duallora", False)


def test_the_seed_is_the_adapters_seed():
    assert SiteConfig(seed=5).adapter.init_seed == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lerning_rate": 0.1}, r"unknown field\(s\) \['lerning_rate'\]"),
        ({"schema": "other/1"}, "field schema is 'other/1'"),
        ({"adapter": {"rank": 4}}, r"field adapter: unknown field\(s\) \['rank'\]"),
        ({"policy": {**get_policy("fedit").to_dict(), "shared_parts": []}}, "field policy"),
    ],
)
def test_a_bad_configuration_names_the_file_and_the_field(change, message, tmp_path):
    path = tmp_path / "site_config.json"
    path.write_text(json.dumps({**SiteConfig().to_dict(), **change}))
    with pytest.raises(ValueError, match=message) as raised:
        SiteConfig.read(path)
    assert str(path) in str(raised.value)


def test_every_setting_is_a_command_line_option():
    parser = argparse.ArgumentParser()
    add_site_arguments(parser)
    options = {action.dest for action in parser._actions}
    settable = {item.name for item in dataclasses.fields(SiteConfig)} - {"policy", "adapter", "run_name"}
    assert settable <= options
    args = parser.parse_args(["--method", "fedsa_lora", "--lr", "0.01", "--no-augment", "--blocks", "1,2"])
    config = site_config_from_arguments(args)
    assert config.policy == get_policy("fedsa_lora") and config.lr == 0.01 and not config.augment
    assert config.adapter.blocks == [1, 2]


@pytest.mark.parametrize(("method", "site_mu"), [("fedit", 0.0), ("med_duallora", 0.2), ("local_only", 0.2)])
def test_the_site_applies_fedprox_itself_only_when_it_keeps_trained_keys(method, site_mu):
    assert SiteConfig.for_method(method, proximal_mu=0.2).site_proximal_mu == site_mu
