"""Every use of NVFlare's private or protected API, fenced here (tests/test_flare_private.py fails when it changes).

Two things have no public API in NVFlare 2.9:
- **Shipping our packages with a job** (BYOC, or an installed `med-duallora`): `FedJob.set_app_packages` exists
  only on the recipe's private `_job`.
- **Our controller in a FedAvg recipe.** `FedAvgRecipe` builds NVFlare's `FedAvg` in its protected
  `_create_controller`, and no argument chooses another class. We let NVFlare build its own `FedAvg` with every
  option the recipe was given, then build `ResilientFedAvg` from that controller's constructor arguments, so that no
  recipe option (save_filename, exclude_vars, stop_cond, fedprox_mu, ...) is dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from nvflare.app_common.workflows.base_fedavg import BaseFedAvg
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

from custom.controller import ResilientFedAvg


def ship_packages(recipe: FedAvgRecipe, packages: Sequence[str]) -> None:
    """Declare `packages` as the job's app packages (imported from the installed project or shipped in custom/)."""
    recipe._job.set_app_packages(list(packages))


def controller_arguments(controller: FedAvg) -> dict[str, Any]:
    """The constructor arguments of a built `FedAvg` (and of `BaseFedAvg`), read back from its attributes.

    Raises when the installed NVFlare has a constructor argument that is not readable back, rather than dropping it.
    """
    arguments: dict[str, Any] = {}
    for cls in (FedAvg, BaseFedAvg):
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if not hasattr(controller, name):
                raise RuntimeError(
                    f"NVFlare's {cls.__name__} takes {name!r} but keeps no attribute of that name: "
                    "jobs/flare_private.py cannot carry the recipe's options over to ResilientFedAvg"
                )
            arguments.setdefault(name, getattr(controller, name))
    return arguments


class PolicyFedAvgRecipe(FedAvgRecipe):
    """NVFlare's PyTorch FedAvgRecipe whose server workflow is `ResilientFedAvg` (all sites each round, failures
    tolerated, the two-stage final evaluation), with every recipe option kept.

    `fedprox_mu` goes to the controller, which sends it with every training task (NVFlare's FedProx); `start_round`
    resumes a round count; `shares_nothing` lets a policy that shares nothing (local-only) run with an empty model;
    `round_timeout_s` bounds every task, `straggler_wait_s` how long a round waits for the rest once the minimum
    answered; `model_spec` lets the server export the final global model (custom.global_export); `replica_seeds`
    runs one federation per seed (custom.controller).
    """

    def __init__(
        self,
        *,
        start_round: int = 0,
        shares_nothing: bool = False,
        fedprox_mu: float | None = None,
        round_timeout_s: int = 0,
        straggler_wait_s: int = 3600,
        model_spec: dict[str, Any] | None = None,
        replica_seeds: tuple[int, ...] = (),
        **recipe_arguments: Any,
    ) -> None:
        # FedAvgRecipe builds the controller inside its __init__: these must be set first.
        self._round_timeout_s = round_timeout_s
        self._straggler_wait_s = straggler_wait_s
        self._start_round = start_round
        self._shares_nothing = shares_nothing
        self._fedprox_mu = fedprox_mu
        self._model_spec = model_spec
        self._replica_seeds = list(replica_seeds)
        super().__init__(**recipe_arguments)

    def _get_controller_kwargs(self) -> dict[str, Any]:
        arguments = super()._get_controller_kwargs()
        if self._fedprox_mu:
            arguments["fedprox_mu"] = self._fedprox_mu
        return arguments

    def _create_controller(self, persistor_id: str, model_params: Any, model_aggregator: Any) -> ResilientFedAvg:
        stock = super()._create_controller(persistor_id, model_params, model_aggregator)
        arguments = controller_arguments(stock)
        arguments.update(start_round=self._start_round, persistor_id=persistor_id)
        return ResilientFedAvg(
            **arguments,
            min_responses=self.min_clients,
            allow_empty_global_weights=self._shares_nothing,
            round_timeout_s=self._round_timeout_s,
            straggler_wait_s=self._straggler_wait_s,
            model_spec=self._model_spec,
            replica_seeds=self._replica_seeds,
        )
