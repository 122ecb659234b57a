"""Dual LoRA on peft: the forward algebra, what requires grad per policy, seeded init, peft-format round trip."""

from __future__ import annotations

import pytest
import torch

from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.dual_lora import (
    DualLoRAConfig,
    adapters_active,
    add_adapters,
    build_policy,
)
from models.policy import POLICY_NAMES, get_policy

CONFIG = ConvViTConfig.preset("micro")  # depth 4: the default adapted blocks are 2 and 3


def make_backbone(seed: int = 0) -> ConvViT:
    torch.manual_seed(seed)
    return ConvViT(CONFIG)


def make_input(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.rand((batch, CONFIG.input_chans, *CONFIG.image_size), generator=torch.Generator().manual_seed(seed))


def randomize_lora_b(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_one_layer_forward_is_w0_plus_both_scaled_products():
    adapter = DualLoRAConfig(global_r=4, global_alpha=8.0, local_r=2, local_alpha=6.0)
    model = add_adapters(make_backbone(), adapter, get_policy("med_duallora")).eval()
    randomize_lora_b(model)
    layer = model.base_model.model.encoder.blocks[3].attn.kv
    x = torch.randn(5, CONFIG.embed_dim)
    base = layer.base_layer
    a_g, b_g = layer.lora_A["global"].weight, layer.lora_B["global"].weight
    a_l, b_l = layer.lora_A["local"].weight, layer.lora_B["local"].weight
    assert b_g.abs().sum() > 0 and b_l.abs().sum() > 0
    expected = x @ base.weight.T + base.bias + (8.0 / 4) * x @ a_g.T @ b_g.T + (6.0 / 2) * x @ a_l.T @ b_l.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with adapters_active(model, get_policy("med_duallora"), ("global",)):
        only_global = x @ base.weight.T + base.bias + 2.0 * x @ a_g.T @ b_g.T
        torch.testing.assert_close(layer(x), only_global, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy_name", [name for name in POLICY_NAMES if name != "fedavg_full"])
def test_zero_b_at_init_gives_the_base_models_output(policy_name):
    x = make_input()
    reference = make_backbone().eval()(x)
    model = add_adapters(make_backbone(), DualLoRAConfig(), get_policy(policy_name)).eval()
    assert torch.equal(model(x), reference)


def test_adapters_are_named_global_and_local_and_both_active():
    model = add_adapters(make_backbone(), DualLoRAConfig(), get_policy("med_duallora"))
    keys = list(model.state_dict())
    for part in ("lora_A.global", "lora_B.global", "lora_A.local", "lora_B.local"):
        assert sum(part in key for key in keys) == 6, part  # 2 blocks x (q, kv, proj)
    assert sorted(model.base_model.active_adapters) == ["global", "local"]
    targeted = {key.split(".lora_")[0] for key in keys if ".lora_" in key}
    assert targeted == {f"base_model.model.encoder.blocks.{b}.attn.{m}" for b in (2, 3) for m in ("q", "kv", "proj")}


def expected_trainable(policy_name: str, key: str) -> bool:
    """Written out by hand from the design table, independently of models.policy."""
    is_head = "pred_head_dict." in key
    if policy_name == "fedavg_full":
        return is_head or key.startswith(("encoder.blocks.2.", "encoder.blocks.3."))
    allowed = {
        "med_duallora": ("lora_A.global", "lora_B.global", "lora_A.local", "lora_B.local"),
        "fedit": ("lora_A.global", "lora_B.global"),
        "ffa_lora": ("lora_B.global",),
        "fedsa_lora": ("lora_A.global", "lora_B.global"),
        "local_only": ("lora_A.local", "lora_B.local"),
    }[policy_name]
    return is_head or any(f".{part}." in key for part in allowed)


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_only_the_intended_parameters_require_and_receive_grad(policy_name):
    adapter = DualLoRAConfig()
    policy = build_policy(policy_name, adapter, CONFIG.depth)
    model = add_adapters(make_backbone(), adapter, policy)
    randomize_lora_b(model)  # so that A receives a non-zero gradient too
    names = [name for name, _ in model.named_parameters()]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == {name: expected_trainable(policy_name, name) for name in names}
    assert any(flags.values())
    model(make_input()).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None and param.grad.abs().sum() > 0) == flags[name], name
    if set(policy.adapters) == {"global", "local"}:
        with adapters_active(model, policy, ("global",)):
            pass  # peft's set_adapter resets requires_grad; leaving the context must restore the policy's
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}


def test_adapter_init_depends_only_on_the_seed():
    torch.manual_seed(123)
    first = lora_tensors(add_adapters(make_backbone(), DualLoRAConfig(init_seed=5), get_policy("med_duallora")))
    torch.manual_seed(999)
    second = lora_tensors(add_adapters(make_backbone(), DualLoRAConfig(init_seed=5), get_policy("med_duallora")))
    other = lora_tensors(add_adapters(make_backbone(), DualLoRAConfig(init_seed=6), get_policy("med_duallora")))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    a_keys = [k for k in first if ".lora_A." in k]
    assert all(not torch.equal(first[k], other[k]) for k in a_keys)
    assert all(first[k].abs().sum() == 0 for k in first if ".lora_B." in k)
    global_a = first["base_model.model.encoder.blocks.2.attn.q.lora_A.global.weight"]
    assert not torch.equal(global_a, first["base_model.model.encoder.blocks.2.attn.q.lora_A.local.weight"])


def test_ffa_lora_a_is_identical_at_every_site_and_stays_frozen():
    policy = get_policy("ffa_lora")
    site_a = add_adapters(make_backbone(seed=0), DualLoRAConfig(), policy)
    torch.manual_seed(77)  # another site's process RNG state must not matter
    site_b = add_adapters(make_backbone(seed=0), DualLoRAConfig(), policy)
    before = {k: v for k, v in lora_tensors(site_a).items() if ".lora_A." in k}
    assert before and all(torch.equal(v, site_b.state_dict()[k]) for k, v in before.items())
    optimizer = torch.optim.AdamW([p for p in site_a.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        site_a(make_input()).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = lora_tensors(site_a)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert any(after[k].abs().sum() > 0 for k in after if ".lora_B." in k)


def build_trained_site(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    model = add_adapters(make_backbone(seed), DualLoRAConfig(local_r=4), get_policy("med_duallora")).eval()
    randomize_lora_b(model)
    with torch.no_grad():
        model.base_model.model.pred_head_dict["sax"].bias.add_(0.5)
    return model, model(make_input())


def test_config_rejects_bad_values_and_resolves_blocks():
    assert DualLoRAConfig().resolve_blocks(12) == (10, 11)
    assert DualLoRAConfig(blocks=[0, -1]).resolve_blocks(4) == (0, 3)
    assert DualLoRAConfig(global_r=4, global_alpha=16).scaling("global") == 4.0
    with pytest.raises(ValueError, match="outside an encoder of depth 4"):
        DualLoRAConfig(blocks=[4]).resolve_blocks(4)
    with pytest.raises(ValueError, match="local_r"):
        DualLoRAConfig(local_r=0)
    with pytest.raises(ValueError, match="global_dropout"):
        DualLoRAConfig(global_dropout=1.0)
