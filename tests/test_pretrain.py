"""The pretraining recipe's guarantees: a separate cohort (checked) and a backbone that loads like CineMA weights."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.cohort import assert_disjoint
from experiments.pretrain import cinema_config, downstream_model, namespace_subject_ids
from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.loading import load_cinema, save_cinema


def _synthesize_and_prepare(root: Path, seed: int) -> None:
    """A real (tiny) synthetic cohort in root/raw, prepared at 32x32x4 into root/prepared by the data_prep CLIs."""
    run = [sys.executable, "-m"]
    subprocess.run(
        [*run, "data_prep.synthesize", "--out", str(root / "raw"), "--seed", str(seed), "--subjects-per-vendor", "2"],
        check=True,
        capture_output=True,
    )
    prepare = ["--raw", str(root / "raw"), "--out", str(root / "prepared"), "--seed", str(seed), "--workers", "1"]
    geometry = ["--crop", "32", "32", "--depth", "4", "--spacing", "6", "6", "10"]
    subprocess.run([*run, "data_prep.prepare", *prepare, *geometry], check=True, capture_output=True)


@pytest.fixture(scope="module")
def prepared_cohort(tmp_path_factory):
    """A real (tiny) synthetic cohort through the real data_prep CLIs."""
    root = tmp_path_factory.mktemp("cohort")
    _synthesize_and_prepare(root, seed=0)
    return root / "prepared"


def test_same_cohort_is_refused_by_id_then_by_content(prepared_cohort, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared_cohort, copy)
    with pytest.raises(ValueError, match="share 8 subject id"):
        assert_disjoint(copy, [prepared_cohort])
    # Renaming the ids does not hide that the subjects are the same: their voxels are identical.
    namespace_subject_ids(copy, "pretrain7_")
    with pytest.raises(ValueError, match="8 identical volume"):
        assert_disjoint(copy, [prepared_cohort])


def test_cohort_from_another_seed_is_disjoint(prepared_cohort, tmp_path):
    other = tmp_path / "other"
    _synthesize_and_prepare(other, seed=1000)
    namespace_subject_ids(other / "prepared", "pretrain1000_")
    assert assert_disjoint(other / "prepared", [prepared_cohort]) == {
        "pretraining_subjects": 8,
        "cohorts_checked": 1,
    }


def test_saved_backbone_loads_through_load_cinema_with_fresh_binary_heads(tmp_path):
    torch.manual_seed(0)
    trained = ConvViT(ConvViTConfig.preset("micro", n_classes=5))
    model = downstream_model(trained, seed=3)
    weights = save_cinema(model, tmp_path / "model.safetensors")
    loaded = load_cinema(weights, ConvViTConfig.preset("micro", n_classes=2))
    state, trained_state = loaded.state_dict(), trained.state_dict()
    for key, value in state.items():
        if key.startswith("pred_head_dict."):
            assert value.shape[0] == 2, key
        else:
            assert torch.equal(value, trained_state[key]), key
    # The heads are seeded: the same seed gives the same checkpoint.
    assert torch.equal(
        downstream_model(trained, seed=3).pred_head_dict["cls"].weight, state["pred_head_dict.cls.weight"]
    )
    config = cinema_config("micro", loaded.config, seed=3, spacing=(3.0, 3.0, 10.0))
    assert config["data"]["pathology"] == ["NOR", "ABN"]
    assert config["model"]["convvit"]["enc_conv_chans"] == [8, 16]


@pytest.mark.parametrize(("objective", "outputs"), [("phenotypes", 15), ("groups", 2)])
def test_each_pretraining_objective_trains_through_the_models_own_heads(objective, outputs):
    from data_prep.phenotypes import PHENOTYPES
    from experiments.pretrain import StandInPretrainer

    targets = {s: torch.randn(len(PHENOTYPES)) for s in ("a", "b")}
    module = StandInPretrainer(ConvViTConfig.preset("micro"), targets, ["LV_DILATED", "NOR"], objective)
    assert module.model.pred_head_dict["cls"].out_features == outputs
    batch = {"image": torch.rand(2, 2, 64, 64, 8), "subject_id": ["a", "b"], "pathology": ["DCM", "NOR"]}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and module.model.pred_head_dict["cls"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="objective"):
        StandInPretrainer(ConvViTConfig.preset("micro"), targets, ["NOR"], "mae")
