"""The fence around NVFlare's private API (jobs/flare_private.py): fails loudly when the installed NVFlare changes
what it relies on, and shows that the controller keeps every recipe option it was given."""

from __future__ import annotations

import contextlib
import inspect
import json

import pytest
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

from jobs.flare_private import PolicyFedAvgRecipe, controller_arguments, ship_packages


def _persistor() -> PTFileModelPersistor:
    return PTFileModelPersistor(source_ckpt_file_full_name="ckpt.pt")


def test_the_protected_hooks_we_override_still_exist_with_their_signatures():
    create = inspect.signature(FedAvgRecipe._create_controller)
    assert list(create.parameters) == ["self", "persistor_id", "model_params", "model_aggregator"]
    assert list(inspect.signature(FedAvgRecipe._get_controller_kwargs).parameters) == ["self"]


def test_the_private_job_can_still_take_app_packages(tmp_path):
    (tmp_path / "client.py").write_text("")
    with contextlib.chdir(tmp_path):
        recipe = FedAvgRecipe(name="fence", min_clients=1, train_script="client.py", model_persistor=_persistor())
    assert callable(recipe._job.set_app_packages)
    ship_packages(recipe, ["models"])


def test_every_fedavg_argument_is_read_back():
    controller = FedAvg(
        num_clients=3, num_rounds=7, start_round=2, save_filename="x.pt", exclude_vars="bn.*", fedprox_mu=0.2
    )
    arguments = controller_arguments(controller)
    assert arguments["num_rounds"] == 7 and arguments["start_round"] == 2
    assert (arguments["save_filename"], arguments["exclude_vars"], arguments["fedprox_mu"]) == ("x.pt", "bn.*", 0.2)


def test_an_argument_nvflare_stops_keeping_is_an_error_not_a_silent_drop():
    controller = FedAvg(num_clients=3, num_rounds=2)
    del controller.exclude_vars
    with pytest.raises(RuntimeError, match="'exclude_vars'"):
        controller_arguments(controller)


def test_the_controller_keeps_every_recipe_option(tmp_path):
    (tmp_path / "client.py").write_text("")
    with contextlib.chdir(tmp_path):
        recipe = PolicyFedAvgRecipe(
            start_round=2,
            fedprox_mu=0.3,
            name="options",
            min_clients=2,
            num_rounds=6,
            train_script="client.py",
            model_persistor=_persistor(),
            best_model_filename="kept.pt",
            exclude_vars="norm.*",
            stop_cond="accuracy >= 0.9",
            patience=3,
        )
        recipe.export(str(tmp_path / "out"))
    server = json.loads((tmp_path / "out" / "options" / "app" / "config" / "config_fed_server.json").read_text())
    workflow = server["workflows"][0]
    assert workflow["path"] == "custom.controller.ResilientFedAvg"
    expected = {
        "num_rounds": 6,
        "start_round": 2,
        "fedprox_mu": 0.3,
        "save_filename": "kept.pt",
        "exclude_vars": "norm.*",
        "stop_cond": "accuracy >= 0.9",
        "patience": 3,
        "min_responses": 2,
    }
    assert {key: workflow["args"].get(key) for key in expected} == expected
