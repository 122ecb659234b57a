"""Sharing policies: key classification with and without wrapper prefixes, fail-closed sharing, counts."""

from __future__ import annotations

import pytest
import torch

from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.dual_lora import DualLoRAConfig, add_adapters
from models.policy import POLICY_NAMES, SharingPolicy, adapter_of, canonical_key, get_policy, parameter_counts

PREFIXES = ("", "model.", "base_model.model.", "model.base_model.model.")
G_A = "encoder.blocks.10.attn.q.lora_A.global.weight"
G_B = "encoder.blocks.11.attn.kv.lora_B.global.weight"
L_A = "encoder.blocks.10.attn.proj.lora_A.local.weight"
L_B = "encoder.blocks.11.attn.q.lora_B.local.weight"
HEAD = "pred_head_dict.sax.weight"
HEAD_CLS_BIAS = "pred_head_dict.cls.bias"
BLOCK_11 = "encoder.blocks.11.attn.q.base_layer.weight"
BLOCK_11_NORM = "encoder.blocks.11.norm1.bias"
BLOCK_3 = "encoder.blocks.3.mlp.fc1.weight"
STEM = "enc_down_dict.sax.conv_blocks.0.patch_embed.conv.weight"
KEYS = (G_A, G_B, L_A, L_B, HEAD, HEAD_CLS_BIAS, BLOCK_11, BLOCK_11_NORM, BLOCK_3, STEM)

# policy -> (trainable keys, shared keys) among KEYS, with the method's default share_head
EXPECTED = {
    "med_duallora": ({G_A, G_B, L_A, L_B, HEAD, HEAD_CLS_BIAS}, {G_A, G_B, HEAD, HEAD_CLS_BIAS}),
    "fedit": ({G_A, G_B, HEAD, HEAD_CLS_BIAS}, {G_A, G_B, HEAD, HEAD_CLS_BIAS}),
    "ffa_lora": ({G_B, HEAD, HEAD_CLS_BIAS}, {G_B, HEAD, HEAD_CLS_BIAS}),
    "fedsa_lora": ({G_A, G_B, HEAD, HEAD_CLS_BIAS}, {G_A}),
    "local_only": ({L_A, L_B, HEAD, HEAD_CLS_BIAS}, set()),
    "fedavg_full": ({BLOCK_11, BLOCK_11_NORM, HEAD, HEAD_CLS_BIAS}, {BLOCK_11, BLOCK_11_NORM, HEAD, HEAD_CLS_BIAS}),
}


def policy_for(name: str, **options):
    return get_policy(name, full_blocks=[10, 11] if name == "fedavg_full" else None, **options)


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_each_policy_classifies_keys_under_any_wrapper_prefix(name, prefix):
    policy = policy_for(name)
    trainable, shared = EXPECTED[name]
    for key in KEYS:
        assert policy.is_trainable(prefix + key) == (key in trainable), (name, prefix + key)
        assert policy.is_shared(prefix + key) == (key in shared), (name, prefix + key)


@pytest.mark.parametrize(
    "key",
    [
        "model.encoder.blocks.10.attn.q.lora_A.evil.weight",  # unknown adapter
        "model.encoder.norm.weight",
        "model.encoder.cls_token",
        "model.enc_down_dict.sax.pos_embed",
        "model.lora_A.global.weight",  # a LoRA name outside any block
        "model.encoder.blocks.10.attn.q.lora_A.global.weight.extra",
        "model.pred_head_dict.lax.weight",
        "something.entirely.else",
        "",
    ],
)
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_unknown_keys_are_never_shared_nor_trained(name, key):
    policy = policy_for(name, share_head=None)
    assert not policy.is_shared(key)
    assert not policy.is_trainable(key)


@pytest.mark.parametrize("name", ["med_duallora", "fedit", "ffa_lora", "fedsa_lora", "fedavg_full"])
def test_share_head_is_an_option(name):
    assert policy_for(name, share_head=True).is_shared("model." + HEAD)
    assert not policy_for(name, share_head=False).is_shared("model." + HEAD)
    assert policy_for(name, share_head=False).is_trainable("model." + HEAD)


def test_defaults_and_invalid_options():
    assert get_policy("med_duallora").share_head and not get_policy("fedsa_lora").share_head
    assert get_policy("ffa_lora").freeze_lora_A and not get_policy("fedit").freeze_lora_A
    assert get_policy("med_duallora").adapters == ("global", "local")
    assert get_policy("local_only").adapters == ("local",)
    with pytest.raises(ValueError, match="unknown sharing policy 'fedavg'"):
        get_policy("fedavg")
    with pytest.raises(ValueError, match="local_only shares nothing"):
        get_policy("local_only", share_head=True)
    with pytest.raises(ValueError, match="fedavg_full needs full_blocks"):
        get_policy("fedavg_full")
    with pytest.raises(ValueError, match="only for fedavg_full"):
        get_policy("fedit", full_blocks=[1])


def test_shared_parts_are_always_trainable():
    for name in POLICY_NAMES:
        for share_head in (None, False):
            policy = policy_for(name, share_head=share_head)
            assert policy.shared_parts <= policy.trainable_parts
            assert policy.describe()["name"] == name


def test_canonical_key_strips_lightning_and_peft_wrappers():
    key = "model.base_model.model.encoder.blocks.10.attn.q.base_layer.weight"
    assert canonical_key(key) == "encoder.blocks.10.attn.q.weight"
    assert canonical_key("_forward_module.model." + HEAD) == HEAD


def test_shared_keys_and_counts_on_a_micro_model():
    torch.manual_seed(0)
    policy = get_policy("med_duallora")
    model = add_adapters(ConvViT(ConvViTConfig.preset("micro")), DualLoRAConfig(), policy)
    keys = list(policy.shared_state_dict(model.state_dict()))
    assert len(keys) == 2 * 3 * 2 + 4  # 2 blocks x (q, kv, proj) x (A, B) + 2 heads x (weight, bias)
    assert all(".global." in key or "pred_head_dict" in key for key in keys)
    # micro: embed 32; one r=8 branch per block: q 8*(32+32) + kv 8*(32+64) + proj 8*(32+32) = 1792
    heads = 2 * (32 * 2 + 2)
    counts = parameter_counts(model, policy)
    assert counts["trainable"] == 2 * 2 * 1792 + heads
    assert counts["shared"] == 2 * 1792 + heads
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_base_size_counts_match_the_cinema_reference():
    # reference-cinema.md §6: one r=8 q+kv+proj branch on 2 base blocks = 86,016; two heads = 3,076.
    policy = get_policy("med_duallora")
    with torch.device("meta"):
        model = add_adapters(ConvViT(ConvViTConfig.preset("base")), DualLoRAConfig(), policy)
    counts = parameter_counts(model, policy)
    assert counts["trainable"] == 2 * 86_016 + 3_076
    assert counts["shared"] == 86_016 + 3_076
    # CineMA's 89,494,212 counts the fixed 2,304 x 768 pos_embed, a buffer here.
    assert counts["total"] == 89_494_212 - 2_304 * 768 + 2 * 86_016


# method -> (is_dual, has_private_parts, has_global_model) with the method's default head setting
DERIVED_FACTS = {
    "med_duallora": (True, True, True),
    "fedit": (False, False, True),
    "ffa_lora": (False, False, True),
    "fedsa_lora": (False, True, False),
    "local_only": (False, True, False),
    "fedavg_full": (False, False, True),
}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_derived_facts_are_properties_of_the_policy(name):
    policy = policy_for(name)
    assert (policy.is_dual, policy.has_private_parts, policy.has_global_model) == DERIVED_FACTS[name]


def test_a_local_head_makes_a_policy_personalised_and_leaves_no_global_model():
    policy = policy_for("med_duallora", share_head=False)
    assert policy.has_private_parts and not policy.has_global_model


@pytest.mark.parametrize("share_head", [None, True, False])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_the_serialised_policy_round_trips(name, share_head):
    if name == "local_only" and share_head:
        return
    policy = policy_for(name, share_head=share_head)
    assert SharingPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shared_parts": ["head", "lora_A.global", "lora_B.global", "lora_A.local"]}, "not the med_duallora policy"),
        ({"trainable_parts": ["head", "lora_A.global", "lora_B.global"]}, "not the med_duallora policy"),
        ({"adapters": ["global"]}, "not the med_duallora policy"),
        ({"name": "fedavg"}, "unknown sharing policy"),
        ({"extra": 1}, "has the fields"),
    ],
)
def test_a_hand_edited_policy_is_refused(change, message):
    """Fails closed: a config that makes med_duallora share its local adapter is not med_duallora."""
    with pytest.raises(ValueError, match=message):
        SharingPolicy.from_dict({**get_policy("med_duallora").to_dict(), **change}, source="job config")


def test_adapter_of_names_the_adapter_of_lora_keys_only():
    assert adapter_of("model.base_model.model." + L_A) == "local"
    assert adapter_of(G_B) == "global"
    assert adapter_of(HEAD) is None and adapter_of(BLOCK_11) is None
