"""DP-SGD at a site (models.dp): per-sample clipping as a manual loop does it, the accountant against independent
figures and across rounds, the model's keys untouched, empty Poisson batches, and the settings that cannot combine."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from opacus.accountants import RDPAccountant

from app.site_config import SiteConfig
from data_prep.datamodule import VendorDataModule
from jobs.recipe import FederationConfig
from models.dp import DPConfig, PrivacyLedger, make_private
from models.lit import QUIET_TRAINER_KWARGS

BATCH = 4
CLIP = 0.05  # small enough that every sample's gradient is clipped


def _module(**settings):
    config = SiteConfig.for_method("med_duallora", class_weights=None, label_smoothing=0.0, **settings)
    module = config.build_module()
    module.train()
    return module


def _trainable(module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def test_without_noise_dp_sgd_is_per_sample_clipping_and_averaging():
    torch.manual_seed(0)
    images, labels = torch.rand(BATCH, 2, 64, 64, 8), torch.tensor([0, 1, 1, 0])
    module = _module()
    # The manual loop: each sample's gradient over every trainable parameter at once, clipped to CLIP, averaged.
    clipped = []
    for image, label in zip(images, labels, strict=True):
        module.zero_grad()
        module._loss(module(image[None]), label[None]).backward()
        grads = [parameter.grad.detach().clone() for parameter in _trainable(module)]
        norm = math.sqrt(sum(float((grad**2).sum()) for grad in grads))
        clipped.append([grad * min(1.0, CLIP / norm) for grad in grads])
    expected = [sum(sample[i] for sample in clipped) / BATCH for i in range(len(clipped[0]))]
    module.zero_grad()
    optimizer = torch.optim.SGD(_trainable(module), lr=0.1)
    hooks, dp_optimizer = make_private(
        module.model, optimizer, DPConfig(8.0, max_grad_norm=CLIP), 0.0, BATCH, BATCH / 40, PrivacyLedger()
    )
    module._loss(module(images), labels).backward()
    assert dp_optimizer.pre_step()
    for parameter, want in zip(_trainable(module), expected, strict=True):
        torch.testing.assert_close(parameter.grad, want, rtol=1e-4, atol=1e-9)
    hooks.cleanup()


def test_the_accountant_matches_independent_figures():
    # q = 1/16, sigma 1.0, 160 steps, delta 1e-5: Opacus' RDP gives 6.0948; Google's dp-accounting (RDP, another
    # order grid) 6.0984 (measured with both libraries outside this project).
    ledger = PrivacyLedger([(1.0, 1 / 16, 80), (1.0, 1 / 16, 80)])  # two rounds of 80 steps each
    assert ledger.epsilon(1e-5) == pytest.approx(6.0948, abs=1e-3)
    assert ledger.epsilon(1e-5) == pytest.approx(6.0984, abs=1e-2)
    assert PrivacyLedger().epsilon(1e-5) == 0.0


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_the_noise_multiplier_spends_the_budget_over_every_round(epsilon):
    config = DPConfig(epsilon, rounds=5)
    sigma = config.noise_multiplier(sample_rate=0.1, steps_per_round=20)
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.1, 100)]
    assert epsilon - 0.05 <= accountant.get_epsilon(1e-5) <= epsilon


def test_training_two_rounds_spends_what_opacus_counts_and_leaves_the_model_as_it_was(prepared_root):
    config = SiteConfig.for_method("med_duallora", dp_epsilon=8.0, dp_rounds=2, local_epochs=1, batch_size=2)
    module = config.build_module()
    keys = list(module.state_dict())
    datamodule = VendorDataModule(prepared_root, clients=["philips"], batch_size=2, seed=0, poisson_sampling=True)
    for _ in range(2):
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", **QUIET_TRAINER_KWARGS)
        trainer.fit(module, datamodule=datamodule)
    rate = 2 / datamodule.num_train_samples
    steps = 2 * len(datamodule.train_dataloader())
    assert module.privacy.steps == steps and {entry[:2] for entry in module.privacy.history} == {
        (module.dp_noise_multiplier, rate)
    }
    opacus_own = RDPAccountant()
    opacus_own.history = [(module.dp_noise_multiplier, rate, steps)]
    assert module.privacy.epsilon(1e-5) == pytest.approx(opacus_own.get_epsilon(1e-5), rel=1e-9)
    assert 7.9 <= module.privacy.epsilon(1e-5) <= 8.0
    assert list(module.state_dict()) == keys  # no `_module.` prefix: the sharing policy still reads the keys
    hooked = [name for name, sub in module.named_modules() if sub._forward_hooks or sub._backward_hooks]
    assert hooked == []  # the per-sample hooks are removed after each fit


def test_an_empty_poisson_batch_is_one_step_of_noise_alone():
    module = _module()
    optimizer = torch.optim.SGD(_trainable(module), lr=0.1)
    ledger = PrivacyLedger()
    hooks, dp_optimizer = make_private(module.model, optimizer, DPConfig(8.0), 0.0, BATCH, 0.1, ledger)
    loss = module.training_step({"image": torch.zeros((0, 2, 64, 64, 8)), "label": torch.zeros(0).long()}, 0)
    loss.backward()
    dp_optimizer.step()
    assert ledger.steps == 1
    assert all(parameter.grad is None or not parameter.grad.any() for parameter in _trainable(module))
    hooks.cleanup()


def test_poisson_sampling_draws_each_subject_independently(prepared_root):
    datamodule = VendorDataModule(prepared_root, batch_size=2, seed=3, augment=False, poisson_sampling=True)
    loader = datamodule.train_dataloader()
    assert len(loader) == datamodule.num_train_samples // 2
    sizes = [len(batch["label"]) for _ in range(40) for batch in loader]  # 40 epochs of the same loader
    assert 0 in sizes and len(set(sizes)) > 3  # batches vary in size, and some are empty
    assert sum(sizes) / len(sizes) == pytest.approx(2, abs=0.2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dp_epsilon": 8.0, "proximal_mu": 0.1}, "cannot be combined"),
        ({"dp_epsilon": -1.0, "dp_rounds": 2}, "epsilon -1.0"),
        ({"dp_epsilon": 8.0, "dp_rounds": 2, "dp_delta": 1.0}, "delta 1.0"),
        ({"dp_epsilon": 8.0, "dp_rounds": 2, "dp_max_grad_norm": 0.0}, "max_grad_norm 0.0"),
        ({"dp_epsilon": 8.0}, "dp_rounds is not"),
    ],
)
def test_settings_that_cannot_give_a_guarantee_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SiteConfig.for_method("med_duallora", **settings).dp_config()


def test_the_federation_gives_the_budget_its_rounds():
    config = FederationConfig.for_method(rounds=7, dp_epsilon=1.0)
    assert config.site.dp_config() == DPConfig(1.0, rounds=7)
    assert config.replace(rounds=3).site.dp_rounds == 3
    assert FederationConfig.for_method(rounds=7).site.dp_config() is None


def test_the_noise_and_the_batches_do_not_follow_the_run_seed(prepared_root):
    """The coordinator knows the run seed (the job carries it): DP-SGD's randomness must not come from it."""

    def batches() -> list[list[str]]:
        torch.manual_seed(0)
        datamodule = VendorDataModule(prepared_root, batch_size=2, seed=0, augment=False, poisson_sampling=True)
        return [batch["subject_id"] for batch in datamodule.train_dataloader()]

    assert batches() != batches()

    def noisy_gradient() -> torch.Tensor:
        torch.manual_seed(0)
        module = _module()
        optimizer = torch.optim.SGD(_trainable(module), lr=0.1)
        hooks, dp_optimizer = make_private(module.model, optimizer, DPConfig(8.0), 1.0, BATCH, 0.1, PrivacyLedger())
        module._loss(module(torch.rand(BATCH, 2, 64, 64, 8)), torch.tensor([0, 1, 1, 0])).backward()
        dp_optimizer.pre_step()
        hooks.cleanup()
        return torch.cat([parameter.grad.reshape(-1) for parameter in _trainable(module)])

    assert not torch.equal(noisy_gradient(), noisy_gradient())
