"""DP-SGD at a site with Opacus: per-sample clipping and Gaussian noise on every trainable parameter, and the RDP
accountant that says what (ε, δ) the site has spent, across rounds and processes (docs/privacy.md).

Opacus is imported where it is used: a site without DP-SGD, and every process that only loads a model, skip it.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import torch

ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class DPConfig:
    """A site's DP-SGD budget: (`epsilon`, `delta`) over `rounds` rounds of training, each sample's gradient clipped
    to `max_grad_norm` (L2, over every trainable parameter at once)."""

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    rounds: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            problems.append(f"epsilon {self.epsilon} must be a finite positive number")
        if not 0 < self.delta < 1:
            problems.append(f"delta {self.delta} must lie in (0, 1)")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            problems.append(f"max_grad_norm {self.max_grad_norm} must be a finite positive number")
        if self.rounds < 1:
            problems.append(f"rounds {self.rounds} must be at least 1")
        if problems:
            raise ValueError("DP-SGD: " + "; ".join(problems))

    def noise_multiplier(self, sample_rate: float, steps_per_round: int) -> float:
        """σ that spends the budget over every round's steps, to within 0.01 of ε (Opacus' RDP search)."""
        from opacus.accountants.utils import get_noise_multiplier

        return get_noise_multiplier(
            target_epsilon=self.epsilon,
            target_delta=self.delta,
            sample_rate=sample_rate,
            steps=self.rounds * steps_per_round,
            accountant=ACCOUNTANT,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def private_generator() -> torch.Generator:
    """A generator for DP-SGD's noise and batch sampling, seeded from the operating system, never from the run seed.

    The job carries the run seed, so the coordinator knows it: noise or batches drawn from it could be replayed,
    and the guarantee would not hold. DP runs are therefore not bit-reproducible. This is torch's generator, not a
    cryptographically secure one (Opacus' secure_mode needs torchcsprng, which has no build for this torch).
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


class PrivacyLedger:
    """The site's privacy spending: the history (σ, q, steps) that Opacus' RDP accountant reads, saved with the
    site's state so that ε composes over every round, whatever process trained it."""

    def __init__(self, history: list[tuple[float, float, int]] | None = None):
        self._history = [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in history or []]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._history)

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self._history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """One DP-SGD step, merged into the last entry when σ and q are the same (as Opacus' accountant does)."""
        if self._history and self._history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, rate, steps = self._history[-1]
            self._history[-1] = (sigma, rate, steps + 1)
        else:
            self._history.append((float(noise_multiplier), float(sample_rate), 1))

    def epsilon(self, delta: float) -> float:
        """ε at `delta` of everything spent so far (0 before the first step), by Opacus' RDP accountant."""
        if not self._history:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = self.history
        return float(accountant.get_epsilon(delta))

    def report(self, config: DPConfig) -> dict[str, Any]:
        """What a model trained under this ledger states about its privacy (an exported model's metadata)."""
        return {
            "mechanism": "DP-SGD (Opacus): per-sample clipping and Gaussian noise on every trainable parameter",
            "accountant": f"{ACCOUNTANT} (Opacus), composed over every step of every round",
            "epsilon": self.epsilon(config.delta),
            "delta": config.delta,
            "max_grad_norm": config.max_grad_norm,
            "noise_multipliers": sorted({float(sigma) for sigma, _, _ in self.history}),
            "sample_rates": sorted({float(rate) for _, rate, _ in self.history}),
            "steps": self.steps,
            "budget": config.to_dict(),
        }


def make_private(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: DPConfig,
    noise_multiplier: float,
    expected_batch_size: int,
    sample_rate: float,
    ledger: PrivacyLedger,
) -> tuple[Any, Any]:
    """Per-sample gradient hooks on `module` (which stays as it is: its state-dict keys keep their names) and
    `optimizer` wrapped to clip each sample's gradient and add Gaussian noise; every step is entered in `ledger`.

    Returns the hooks (call `.cleanup()` to remove them) and the DP optimizer.
    """
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer

    hooks = prepare_module(module, grad_sample_mode="hooks", wrap_model=False, batch_first=True, loss_reduction="mean")
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=private_generator(),
    )
    dp_optimizer.attach_step_hook(lambda optimizer: ledger.step(optimizer.noise_multiplier, sample_rate))
    return hooks, dp_optimizer
