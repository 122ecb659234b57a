"""DualLoRAClassifier: frozen prefix without autograd, exact prefix cache, metrics, state exchange, checkpoints."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.dual_lora import backbone_of
from models.lit import DualLoRAClassifier, detection_metrics, flatten_metrics
from models.loading import save_cinema
from models.prefix_cache import PrefixCache, run_frozen_prefix

CONFIG = ConvViTConfig.preset("micro")


def make_module(**kwargs) -> DualLoRAClassifier:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone on purpose
        return DualLoRAClassifier(backbone="micro", **kwargs)


def make_images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand((batch, CONFIG.input_chans, *CONFIG.image_size), generator=torch.Generator().manual_seed(seed))


def randomize_lora_b(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_frozen_blocks_run_without_grad_and_adapted_blocks_with_it():
    module = make_module().train()
    assert module.start_block == 2
    grad_enabled: dict[int, bool] = {}
    for index, block in enumerate(backbone_of(module.model).encoder.blocks):
        block.register_forward_hook(lambda m, i, o, index=index: grad_enabled.__setitem__(index, o.requires_grad))
    module(make_images()).sum().backward()
    assert grad_enabled == {0: False, 1: False, 2: True, 3: True}


def test_module_output_equals_the_plain_forward_at_init():
    module = make_module().eval()
    images = make_images()
    torch.testing.assert_close(module(images), backbone_of(module.model)(images), rtol=1e-5, atol=1e-6)


def test_cached_prefix_equals_uncached_and_is_reused():
    module = make_module(cache_train_prefix=True).train()
    randomize_lora_b(module)
    images, ids = make_images(4), ["a", "b", "c", "d"]
    uncached = module(images)
    first = module(images, ids)
    again = module(images, ids)
    assert torch.equal(first, uncached) and torch.equal(again, uncached)
    assert (module.prefix_cache.misses, module.prefix_cache.hits) == (4, 4)
    # another batch composition: hits and misses mixed, still bitwise the uncached result per sample
    mixed = torch.cat([images[2:3], make_images(1, seed=9), images[0:1]])
    assert torch.equal(module(mixed, ["c", "e", "a"]), module(mixed))
    assert (module.prefix_cache.misses, module.prefix_cache.hits) == (5, 6)


def test_cache_is_invalidated_by_new_input_or_new_backbone_weights():
    module = make_module(cache_train_prefix=True).eval()
    images, ids = make_images(2), ["a", "b"]
    module(images, ids)
    edited = images.clone()
    edited[1, 0, 0, 0, 0] += 0.25  # same subject id, different input (e.g. augmentation)
    assert torch.equal(module(edited, ids), module(edited))
    assert module.prefix_cache.misses == 3
    backbone = backbone_of(module.model)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    stem_key = "enc_down_dict.sax.conv_blocks.0.patch_embed.conv.weight"
    state[stem_key] += 0.1
    backbone.load_state_dict(state)
    assert len(module.prefix_cache) == 2
    assert torch.equal(module(edited, ids), module(edited))
    assert module.prefix_cache.misses == 5 and len(module.prefix_cache) == 2
    with torch.no_grad():
        backbone.encoder.blocks[0].attn.q.weight.mul_(1.5)  # in-place edit of a frozen prefix block
    assert torch.equal(module(edited, ids), module(edited))
    assert module.prefix_cache.misses == 7


def test_cache_memory_is_bounded_with_lru_eviction():
    backbone = ConvViT(CONFIG).eval()
    images = make_images(4)
    one = run_frozen_prefix(backbone, images[:1], 2)
    entry_bytes = one.tokens.nbytes + one.skip_tokens.nbytes
    cache = PrefixCache(max_bytes=2 * entry_bytes)
    cache.features(backbone, images, ["a", "b", "c", "d"], 2)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    cache.features(backbone, images[2:], ["c", "d"], 2)
    assert cache.hits == 2
    with pytest.raises(ValueError, match="duplicate subject ids"):
        cache.features(backbone, images[:2], ["a", "a"], 2)


def test_detection_metrics_by_hand_and_undefined_cases():
    # labels 0 0 0 1 1 1 1, predictions 0 1 0 1 1 0 1: tn 2, fp 1, fn 1, tp 3
    probs = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.8, 0.3, 0.6])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    metrics = detection_metrics(probs, labels)
    assert metrics["sensitivity"] == pytest.approx(0.75)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["bal_acc"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert metrics["mcc"] == pytest.approx(5 / 12)
    assert metrics["f1"] == pytest.approx(0.75)
    assert metrics["auroc"] == pytest.approx(10 / 12)  # 10 of the 12 (pos, neg) pairs are ordered right
    diseased_only = detection_metrics(torch.tensor([0.9, 0.2]), torch.tensor([1, 1]))
    assert math.isnan(diseased_only["specificity"]) and math.isnan(diseased_only["bal_acc"])
    assert math.isnan(diseased_only["auroc"]) and diseased_only["sensitivity"] == 0.5


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    module = make_module(lr=1e-3, min_lr=1e-5, warmup_epochs=2, max_epochs=10)
    assert module.lr_factor(0.0) < 0.01
    assert module.lr_factor(1.0) == pytest.approx(0.5, abs=1e-3)
    assert module.lr_factor(2.0) == pytest.approx(1.0)
    assert module.lr_factor(6.0) == pytest.approx(0.01 + 0.99 * 0.5)
    assert module.lr_factor(10.0) == pytest.approx(0.01) and module.lr_factor(12.0) == pytest.approx(0.01)


def test_no_weight_decay_on_one_dimensional_parameters():
    module = make_module(weight_decay=0.05)
    optimizer = module.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        assert all((p.ndim > 1) == (group["weight_decay"] == 0.05) for p in group["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in module.parameters())


def test_shared_state_dict_exchange_as_nvflare_does_it():
    sender, receiver = make_module(), make_module()
    randomize_lora_b(sender)
    shared = sender.shared_state_dict()
    assert shared and all(k.startswith("model.base_model.model.") for k in shared)
    assert any(".lora_A.global." in k for k in shared) and not any(".local." in k for k in shared)
    local_before = {k: v.clone() for k, v in receiver.state_dict().items() if ".lora_B.local." in k}
    result = receiver.load_state_dict(shared, strict=False)  # what flare.patch(load_state_dict_strict=False) does
    assert not result.unexpected_keys
    received = receiver.state_dict()
    assert all(torch.equal(received[k], v) for k, v in shared.items())
    assert all(torch.equal(received[k], v) for k, v in local_before.items())
    receiver.load_shared_state_dict(shared)
    with pytest.raises(ValueError, match="does not share keys"):
        receiver.load_shared_state_dict(sender.trainable_state_dict())


LOCAL_A = "model.base_model.model.encoder.blocks.3.attn.q.lora_A.local.weight"
GLOBAL_B = "model.base_model.model.encoder.blocks.3.attn.q.lora_B.global.weight"
POS_EMBED = "model.base_model.model.enc_down_dict.sax.pos_embed"


def _tamper(state: dict, change: str) -> dict:
    state = dict(state)
    if change == "local key":
        state[LOCAL_A] = torch.zeros(8, 32)
    elif change == "frozen key":
        state[POS_EMBED] = torch.zeros(1)
    elif change == "missing key":
        del state[GLOBAL_B]
    elif change == "wrong shape":
        state[GLOBAL_B] = torch.zeros(3, 3)
    elif change == "integer values":
        state[GLOBAL_B] = torch.zeros_like(state[GLOBAL_B], dtype=torch.int64)
    elif change == "nothing":
        state = {}
    elif change == "a string":
        state[GLOBAL_B] = "0.0"
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("local key", "does not share keys"),
        ("frozen key", "does not share keys"),
        ("missing key", "shared keys missing"),
        ("nothing", "shared keys missing"),
        ("wrong shape", r"torch.float32 \(3, 3\)"),
        ("integer values", "torch.int64"),
        ("a string", "is str"),
    ],
)
def test_a_received_global_model_is_checked_before_it_loads(change, message):
    """What a site receives must be a global model of its policy; nothing of it loads otherwise."""
    module = make_module()
    good = module.shared_state_dict()
    assert module.global_model_problems(good) == []
    before = {key: value.clone() for key, value in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        module.load_shared_state_dict(_tamper(good, change))
    assert all(torch.equal(before[key], value) for key, value in module.state_dict().items())


def test_global_only_evaluation_drops_the_local_adapter():
    module = make_module(eval_global_only=True).eval()
    randomize_lora_b(module)
    batch = {"image": make_images(4), "label": torch.tensor([0, 1, 0, 1]), "subject_id": list("abcd")}
    batch["client"] = ["ge", "ge", "canon", "canon"]
    module._eval_step("val", batch)
    personal, global_only = module._eval_outputs["val"][0], module._eval_outputs["val_global_only"][0]
    assert not torch.equal(personal.logits, global_only.logits)
    assert sorted(module.model.base_model.active_adapters) == ["global", "local"]
    grouped = module.grouped_metrics(module._eval_outputs["val_global_only"])
    assert grouped["pooled"]["n"] == 4 and grouped["clients"]["ge"]["n"] == 2
    metrics = flatten_metrics("val_global_only", grouped)
    assert metrics["val_global_only_ge_n"] == 2 and "val_global_only_canon_bal_acc" in metrics
    predictions = module.subject_predictions(module._eval_outputs["val_global_only"])
    assert [(p["subject_id"], p["client"], p["label"]) for p in predictions] == [
        ("a", "ge", 0),
        ("b", "ge", 1),
        ("c", "canon", 0),
        ("d", "canon", 1),
    ]
    expected = global_only.logits.softmax(1)[:, 1].tolist()
    assert [p["p_diseased"] for p in predictions] == pytest.approx(expected)
    with pytest.raises(ValueError, match="eval_global_only needs both adapters"):
        make_module(policy="fedit", eval_global_only=True)


def test_multiclass_targets_come_from_pathology():
    module = make_module(task="multiclass", classes="acdc")
    batch = {"pathology": ["NOR", "DCM", "RV"], "subject_id": ["a", "b", "c"]}
    assert module._targets(batch).tolist() == [3, 0, 4]
    assert module(make_images()).shape == (3, 5)
    with pytest.raises(ValueError, match="pathology \\['HHD'\\] not in classes"):
        module._targets({"pathology": ["HHD"], "subject_id": ["x"]})
    with pytest.raises(ValueError, match="classes is only for task=multiclass"):
        make_module(classes="acdc")


def batches(n: int, seed: int) -> list[dict]:
    images = make_images(n, seed)
    labels = torch.arange(n) % 2
    return [{"image": images[i], "label": labels[i], "subject_id": f"s{seed}-{i}", "client": "ge"} for i in range(n)]


def test_checkpoint_holds_trainable_parameters_only_and_reloads(tmp_path):
    torch.manual_seed(0)
    weights = save_cinema(ConvViT(CONFIG), tmp_path / "backbone.safetensors")
    module = make_module(weights=str(weights), max_epochs=1)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(module, DataLoader(batches(4, 0), batch_size=2))
    path = tmp_path / "site.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert set(saved) == set(module.trainable_state_dict())
    assert len(saved) == 2 * 2 * 3 * 2 + 4  # (global, local) x 2 blocks x (q, kv, proj) x (A, B) + heads
    reloaded = DualLoRAClassifier.load_from_checkpoint(path)
    images = make_images()
    assert torch.equal(reloaded.eval()(images), module.eval()(images))
    del saved[next(iter(saved))]
    torch.save({**torch.load(path, weights_only=False), "state_dict": saved}, path)
    with pytest.raises(ValueError, match="checkpoint lacks trainable keys"):
        DualLoRAClassifier.load_from_checkpoint(path)


class TinyDataModule(pl.LightningDataModule):
    """Stands in for VendorDataModule where only its loaders and `train_class_counts` matter."""

    train_class_counts = [1, 3]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(batches(4, 0), batch_size=2)


def test_fedavg_full_trains_exactly_its_blocks_and_heads_with_inverse_frequency_weights():
    module = make_module(policy="fedavg_full", class_weights="inverse_frequency", max_epochs=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=TinyDataModule())
    assert module.class_weight.tolist() == pytest.approx([1.5, 0.5])  # 1/count, normalised to sum 2
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(
        k.startswith(("model.encoder.blocks.2.", "model.encoder.blocks.3.", "model.pred_head_dict.")) for k in changed
    )
    assert any(k.startswith("model.encoder.blocks.2.") for k in changed)


def _shift_after_training(proximal_mu: float) -> dict[str, float]:
    """Distance each trainable parameter moved in 6 epochs of 2 steps (lr 0.05, so that moves are large).

    AdamW's first step moves every parameter by about lr whatever the loss (the proximal gradient is 0 there);
    the proximal term shows in the steps after it.
    """
    module = make_module(policy="med_duallora", lr=0.05, warmup_epochs=0, min_lr=0.05, proximal_mu=proximal_mu)
    before = {k: v.clone() for k, v in module.trainable_state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=TinyDataModule())
    return {k: float((v - before[k]).norm()) for k, v in module.trainable_state_dict().items()}


def test_fedprox_term_holds_the_shared_keys_near_the_round_start_and_leaves_local_ones_free():
    free, held = _shift_after_training(0.0), _shift_after_training(1e4)
    shared = [k for k in free if ".local." not in k]
    local = [k for k in free if ".local." in k and ".lora_B." in k]
    assert shared and local
    assert sum(held[k] for k in shared) < 0.2 * sum(free[k] for k in shared)
    assert sum(held[k] for k in local) > 0.5 * sum(free[k] for k in local)


def test_fedprox_term_is_zero_at_the_anchor_and_half_mu_times_the_squared_distance():
    module = make_module(policy="fedit", proximal_mu=0.5)
    assert module.proximal_term().item() == 0.0  # no anchor before fitting starts
    module.on_train_start()
    assert set(module._proximal_anchor) == set(module.shared_state_dict())
    assert module.proximal_term().item() == 0.0
    name = next(iter(module._proximal_anchor))
    with torch.no_grad():
        dict(module.named_parameters())[name].add_(2.0)
    assert module.proximal_term().item() == pytest.approx(0.5 * 0.5 * 4.0 * module._proximal_anchor[name].numel())
