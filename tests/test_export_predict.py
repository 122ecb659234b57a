"""Exported model folders (models.export) load back exactly, with plain peft too, and `python -m app.predict` scores
studies as training saw them."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import models.export as export
from app import predict
from data_prep.datamodule import CachedVolumes
from data_prep.prepare import run_prepare
from data_prep.preprocess import Geometry
from data_prep.report import read_manifest
from models.config import ConvViTConfig
from models.convvit import ConvViT
from models.dual_lora import activate_adapters, backbone_of
from models.export import (
    BLOCKS_FILE,
    HEADS_FILE,
    METADATA_FILE,
    MODEL_SCHEMA,
    BackboneMismatchError,
    ModelFormatError,
    backbone_record,
    input_contract,
    load_model,
    read_metadata,
    write_model,
)
from models.lit import DualLoRAClassifier
from models.loading import load_cinema, save_cinema
from models.standin import read_record

REPO = Path(__file__).resolve().parents[1]
CONFIG = ConvViTConfig.preset("micro")  # takes 64x64x8
GEOMETRY = Geometry(crop=(64, 64), spacing=(3.0, 3.0, 10.0), depth=8)  # conftest's GEOMETRY
SPACING = GEOMETRY.spacing
THRESHOLD = 0.37
# (policy, active adapters of the exported model, kind)
CASES = [
    ("med_duallora", ("global", "local"), "personalised"),
    ("med_duallora", ("global",), "global"),
    ("fedit", ("global",), "global"),
    ("local_only", ("local",), "personalised"),
    ("fedavg_full", (), "global"),
]
CASE_IDS = ["med_duallora-personalised", "med_duallora-global", "fedit", "local_only", "fedavg_full"]
ADAPTER_CASES = [case for case in CASES if case[1]]
ADAPTER_IDS = [name for name, case in zip(CASE_IDS, CASES, strict=True) if case[1]]


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand((batch, CONFIG.input_chans, *CONFIG.image_size), generator=torch.Generator().manual_seed(seed))


def save_random_backbone(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_cinema(ConvViT(CONFIG), path)
    return path


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro backbone saved in CineMA's format: the 'CineMA checkpoint' the exported models run on."""
    return save_random_backbone(tmp_path_factory.mktemp("backbone") / "backbone.safetensors", seed=0)


def trained_module(policy: str, adapters: tuple[str, ...], weights: str) -> DualLoRAClassifier:
    """A module whose every trained part (adapters A and B, heads, blocks) is moved away from its initialisation,
    with `adapters` active, in eval mode."""
    torch.manual_seed(0)
    module = DualLoRAClassifier(backbone="micro", weights=weights, policy=policy)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, parameter in module.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    if adapters and set(adapters) != set(module.policy.adapters):
        activate_adapters(module.model, module.policy, adapters)
    return module.eval()


def metadata_for(kind: str, weights: str) -> dict:
    return {
        "kind": kind,
        "site": "ge" if kind == "personalised" else None,
        "round": 4,
        "input_contract": input_contract(CONFIG, SPACING),
        "metrics": {
            "validation": {"n": 12, "auroc": 0.75, "bal_acc": 0.7, "sensitivity": float("nan"), "specificity": 0.5},
            "test": {"n": 25, "auroc": 0.8, "bal_acc": 0.72, "sensitivity": 0.8, "specificity": 0.64},
        },
        "threshold_source": "test fixture",
        "backbone_weights": backbone_record(weights),
    }


def export_case(policy: str, adapters: tuple[str, ...], kind: str, weights: str, out: Path) -> DualLoRAClassifier:
    module = trained_module(policy, adapters, weights)
    write_model(
        out, module.model, module.policy, module.adapter_config, adapters, THRESHOLD, metadata_for(kind, weights)
    )
    return module


@pytest.fixture(scope="module")
def exported(backbone_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Every case exported once: (model folder, the exporting module's logits on `images()`)."""
    root = tmp_path_factory.mktemp("exported")
    result = {}
    for case_id, (policy, adapters, kind) in zip(CASE_IDS, CASES, strict=True):
        module = export_case(policy, adapters, kind, str(backbone_file), root / case_id)
        with torch.no_grad():
            result[case_id] = (root / case_id, module(images()))
    return result


# ---- export and load -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "adapters", "kind"), CASES, ids=CASE_IDS)
def test_export_then_load_gives_the_same_logits(exported, backbone_file, policy, adapters, kind, request):
    case_id = request.node.callspec.id
    model_dir, expected = exported[case_id]
    loaded = load_model(model_dir)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), expected, rtol=0, atol=1e-6)
        untrained = DualLoRAClassifier(backbone="micro", weights=str(backbone_file), policy=policy).eval()
        assert not torch.allclose(untrained(images()), expected, atol=1e-3)  # the exported parts matter
    if adapters:
        assert set(loaded.model.base_model.active_adapters) == set(adapters)
    assert loaded.thresholds["model"] == THRESHOLD
    assert loaded.export_metadata["kind"] == kind


@pytest.mark.parametrize(("policy", "adapters", "kind"), ADAPTER_CASES, ids=ADAPTER_IDS)
def test_plain_peft_loads_the_adapter_folders(exported, backbone_file, policy, adapters, kind, request):
    model_dir, expected = exported[request.node.callspec.id]
    convvit = load_cinema(backbone_file, CONFIG)
    missing, unexpected = convvit.load_state_dict(load_file(model_dir / HEADS_FILE), strict=False)
    assert not unexpected
    first, *others = adapters
    model = PeftModel.from_pretrained(convvit, model_dir / first, adapter_name=first)
    for name in others:
        model.load_adapter(model_dir / name, adapter_name=name)
    model.base_model.set_adapter(list(adapters))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images()), expected, rtol=1e-5, atol=1e-5)
    assert sorted(path.name for path in model_dir.iterdir() if path.is_dir()) == sorted(adapters)


@pytest.mark.parametrize(("policy", "adapters", "kind"), CASES, ids=CASE_IDS)
def test_metadata_records_the_model(exported, backbone_file, policy, adapters, kind, request):
    model_dir, _ = exported[request.node.callspec.id]
    metadata = read_metadata(model_dir)
    assert metadata["schema"] == MODEL_SCHEMA
    assert metadata["adapters"] == list(adapters)
    assert metadata["policy"]["name"] == policy
    assert metadata["adapter_config"]["global_r"] == 8
    assert ConvViTConfig(**metadata["backbone"]["config"]) == CONFIG
    assert metadata["backbone"]["weights"] == str(backbone_file)
    assert metadata["backbone"]["sha256"] == backbone_record(str(backbone_file))["sha256"] is not None
    assert metadata["backbone_weights"]["file"] == str(backbone_file)
    assert metadata["threshold"] == THRESHOLD
    assert "> threshold" in metadata["decision_rule"]
    assert metadata["input_contract"]["spatial_shape"] == [64, 64, 8]
    assert metadata["input_contract"]["channels"] == ["ED", "ES"]
    assert metadata["metrics"]["validation"]["sensitivity"] is None  # NaN written as strict JSON
    assert (metadata["kind"], metadata["round"]) == (kind, 4)
    written = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert sorted(metadata["files"]) == [name for name in written if name != METADATA_FILE]
    assert (BLOCKS_FILE in metadata["files"]) == (policy == "fedavg_full")
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "Not for clinical use" in card and "python -m app.predict" in card and "| test | all | 25 |" in card


def test_the_standin_token_is_recorded_and_resolved(tmp_path):
    module = export_case("fedit", ("global",), "centralized", "standin", tmp_path / "model")
    metadata = read_metadata(tmp_path / "model")
    assert metadata["backbone"]["weights"] == "standin"
    assert metadata["backbone"]["sha256"] == read_record()["weights_sha256"]
    assert "the stand-in backbone is NOT CineMA" in (tmp_path / "model" / "README.md").read_text(encoding="utf-8")
    x = torch.rand((2, 2, *backbone_of(module.model).config.image_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "model")(x), module(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / HEADS_FILE).write_bytes((d / HEADS_FILE).read_bytes()[:-4] + b"\0\0\0\0"), HEADS_FILE),
        (lambda d: (d / "local" / "adapter_model.safetensors").unlink(), "local/adapter_model.safetensors"),
        (lambda d: (d / "global" / "adapter_config.json").write_text("{}"), "global/adapter_config.json"),
    ],
    ids=["heads-modified", "local-adapter-missing", "adapter-config-replaced"],
)
def test_a_tampered_or_missing_file_is_refused(exported, tmp_path, damage, named):
    model_dir = shutil.copytree(exported["med_duallora-personalised"][0], tmp_path / "model")
    damage(model_dir)
    with pytest.raises(ModelFormatError, match=named):
        load_model(model_dir)


def test_a_missing_or_invalid_metadata_field_is_named(exported, tmp_path):
    model_dir = shutil.copytree(exported["fedit"][0], tmp_path / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match=f"empty/{METADATA_FILE}: missing"):
        read_metadata(tmp_path / "empty")
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    for field, value, message in [
        ("threshold", None, "missing field"),
        ("threshold", 1.5, "field threshold"),
        ("schema", "other/1", "field schema"),
        ("adapters", ["local"], "field adapters"),
    ]:
        broken = {**metadata, field: value} if value is not None else {k: v for k, v in metadata.items() if k != field}
        (model_dir / METADATA_FILE).write_text(json.dumps(broken))
        with pytest.raises(ModelFormatError, match=f"{METADATA_FILE}: .*{message}"):
            read_metadata(model_dir)


def test_another_backbone_is_refused_unless_forced(exported, tmp_path):
    model_dir, expected = exported["med_duallora-personalised"]
    other = save_random_backbone(tmp_path / "other.safetensors", seed=1)
    recorded = read_metadata(model_dir)["backbone"]["sha256"]
    with pytest.raises(BackboneMismatchError) as refused:
        load_model(model_dir, weights=str(other))
    assert recorded in str(refused.value) and backbone_record(str(other))["sha256"] in str(refused.value)
    assert str(other) in str(refused.value)
    with pytest.warns(UserWarning, match="differs"):
        forced = load_model(model_dir, weights=str(other), force=True)
    with torch.no_grad():
        assert not torch.allclose(forced(images()), expected, atol=1e-3)


def test_a_global_model_written_without_the_backbone_file_loads_with_given_weights(backbone_file, tmp_path):
    """The server's case: the backbone is configured but not present, so no sha256; metrics per site."""
    module = trained_module("fedit", ("global",), str(backbone_file))
    metadata = {
        **metadata_for("global", str(backbone_file)),
        "backbone_weights": backbone_record("$CINEMA_DIR/cinema.safetensors"),
        "metrics": {"validation": {"pooled_threshold": None}, "test": {"ge": {"n": 7, "auroc": 0.9}}},
    }
    assert metadata["backbone_weights"]["sha256"] is None
    write_model(tmp_path / "m", module.model, module.policy, module.adapter_config, ("global",), 0.5, metadata)
    assert "| test | ge | 7 | 0.900 |" in (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="cinema.safetensors"):
        load_model(tmp_path / "m")
    with pytest.warns(UserWarning, match="cannot be verified"):
        loaded = load_model(tmp_path / "m", weights=str(backbone_file))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), module(images()), rtol=0, atol=1e-6)


def test_a_failed_write_keeps_the_old_folder_and_leaves_nothing_complete(
    exported, backbone_file, tmp_path, monkeypatch
):
    model_dir = shutil.copytree(exported["fedavg_full"][0], tmp_path / "model")
    before = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    module = trained_module("fedavg_full", (), str(backbone_file))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "model_card", crash)  # after the heads and blocks are written, before metadata.json
    for target in (model_dir, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            write_model(
                target, module.model, module.policy, module.adapter_config, (), 0.5, metadata_for("global", "random")
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder, no `new`
    assert {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    write_model(
        model_dir, module.model, module.policy, module.adapter_config, (), 0.25, metadata_for("global", "random")
    )
    assert read_metadata(model_dir)["threshold"] == 0.25  # a complete write does replace it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_that_is_not_a_model_is_never_replaced(backbone_file, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    module = trained_module("fedit", ("global",), str(backbone_file))
    with pytest.raises(FileExistsError, match="not a model folder"):
        write_model(
            tmp_path / "data",
            module.model,
            module.policy,
            module.adapter_config,
            ("global",),
            0.5,
            metadata_for("global", "random"),
        )
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"


# ---- predict_step and app.predict ------------------------------------------------------------------------------


def test_predict_step_applies_the_threshold_as_evaluation_does(exported):
    module = load_model(exported["fedit"][0])
    batch = {"image": images(), "study_id": ["a", "b", "c"]}
    with torch.no_grad():
        p = module(batch["image"]).softmax(1)[:, 1]
    module.thresholds["model"] = float(p[1])  # exactly one score: not called (strictly greater)
    rows = module.predict_step(batch, 0)
    assert [r["study_id"] for r in rows] == ["a", "b", "c"]
    assert [r["p_diseased"] for r in rows] == pytest.approx(p.tolist(), abs=1e-7)
    assert [r["diseased"] for r in rows] == [bool(v > float(p[1])) for v in p] and rows[1]["diseased"] is False


def add_lv_label(folder: Path, pid: str) -> Path:
    """An off-centre LV label map (value 3) beside a CineMA-layout subject: the crop then follows it."""
    ed = nib.load(folder / f"{pid}_sax_ed.nii.gz")
    label = np.zeros(ed.shape, dtype=np.uint8)
    label[30:60, 120:150, :] = 3
    path = folder / f"{pid}_sax_ed_gt.nii.gz"
    nib.save(nib.Nifti1Image(label, ed.affine), path)
    return path


def prepared_scores(module: DualLoRAClassifier, root: Path) -> dict[str, float]:
    """P(diseased) of each prepared subject, read the datamodule's way and scored directly through the module."""
    rows = read_manifest(root / "manifest.csv")
    volumes = CachedVolumes(root, rows, None)
    with torch.no_grad():
        return {
            row["subject_id"]: float(module(volumes[i]["image"][None]).softmax(1)[0, 1]) for i, row in enumerate(rows)
        }


def test_predict_scores_studies_as_prepare_and_the_datamodule_do(exported, cinema_examples, tmp_path):
    model_dir = exported["med_duallora-personalised"][0]
    folders = {pid: cinema_examples / "train" / pid for pid in ("patient_example", "mnms_example", "mnms2_example")}
    label = add_lv_label(folders["mnms_example"], "mnms_example")
    result = run_prepare([cinema_examples], tmp_path / "prepared", seed=0, geometry=GEOMETRY, workers=1)
    assert not result.problems and {r["crop_method"] for r in result.rows} == {"centre", "lv_label"}
    expected = prepared_scores(load_model(model_dir), tmp_path / "prepared")
    studies = tmp_path / "studies.csv"
    lines = ["study_id,ed,es,ed_label"]
    for pid, folder in folders.items():
        relative = Path("..") / folder.relative_to(tmp_path)
        gt = relative / label.name if pid == "mnms_example" else ""
        lines.append(f"{pid},{relative / f'{pid}_sax_ed.nii.gz'},{relative / f'{pid}_sax_es.nii.gz'},{gt}")
    (tmp_path / "lists").mkdir()
    studies = tmp_path / "lists" / "studies.csv"
    studies.write_text("\n".join(lines) + "\n")
    assert predict.main(["--model", str(model_dir), "--studies", str(studies), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(predict.OUTPUT_COLUMNS)
    by_subject = {"patient_example": "acdc_", "mnms_example": "mnms_", "mnms2_example": "mnms2_"}
    for row in rows:
        assert float(row["p_diseased"]) == pytest.approx(
            expected[by_subject[row["study_id"]] + row["study_id"]], abs=1e-6
        )
        assert row["diseased"] == str(float(row["p_diseased"]) > THRESHOLD)
        assert (float(row["threshold"]), row["model"]) == (THRESHOLD, str(model_dir))


def test_predict_one_study_to_json_from_the_command_line(exported, cinema_examples, tmp_path):
    model_dir = exported["med_duallora-global"][0]
    folder = cinema_examples / "train" / "patient_example"
    out = tmp_path / "out" / "p.json"
    command = [sys.executable, "-m", "app.predict", "--model", str(model_dir), "--out", str(out)]
    command += [
        "--ed",
        str(folder / "patient_example_sax_ed.nii.gz"),
        "--es",
        str(folder / "patient_example_sax_es.nii.gz"),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert (written["kind"], written["policy"], written["threshold"]) == ("global", "med_duallora", THRESHOLD)
    (row,) = written["predictions"]
    assert row["study_id"] == "patient_example" and 0.0 <= row["p_diseased"] <= 1.0
    assert set(row) == set(predict.OUTPUT_COLUMNS)
    assert "Traceback" not in done.stderr


def test_raw_input_crops_on_the_motion_and_changes_the_score(exported, cinema_examples, tmp_path):
    model_dir = exported["fedit"][0]
    folder = cinema_examples / "train" / "mnms_example"
    base = ["--model", str(model_dir), "--ed", str(folder / "mnms_example_sax_ed.nii.gz")]
    base += ["--es", str(folder / "mnms_example_sax_es.nii.gz")]
    scores = {}
    for layout in ("cinema", "raw"):
        assert predict.main([*base, "--input", layout, "--out", str(tmp_path / f"{layout}.json")]) == 0
        scores[layout] = json.loads((tmp_path / f"{layout}.json").read_text())["predictions"][0]["p_diseased"]
    assert scores["cinema"] != pytest.approx(scores["raw"], abs=1e-6)


def write_like(source: Path, path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, nib.load(source).affine), path)
    return path


def error_case(name: str, model_dir: Path, folder: Path, tmp_path: Path) -> tuple[list[str], list[str]]:
    """(command-line arguments, words the error line must contain) of one bad input."""
    ed, es = folder / "patient_example_sax_ed.nii.gz", folder / "patient_example_sax_es.nii.gz"
    data = np.asanyarray(nib.load(ed).dataobj)
    one = ["--model", str(model_dir), "--out", str(tmp_path / "p.json")]
    if name == "missing-ed":
        return [*one, "--ed", str(tmp_path / "nope.nii.gz"), "--es", str(es)], ["nope.nii.gz", "missing"]
    if name == "not-3d":
        four_d = write_like(ed, tmp_path / "ed4d.nii.gz", np.stack([data, data], axis=-1))
        return [*one, "--ed", str(four_d), "--es", str(es)], ["ed4d.nii.gz", "3D"]
    if name == "shapes-differ":
        smaller = write_like(es, tmp_path / "es_small.nii.gz", data[:-8])
        return [*one, "--ed", str(ed), "--es", str(smaller)], ["es_small.nii.gz", "differs from ED shape"]
    if name == "csv-columns":
        (tmp_path / "s.csv").write_text(f"id,ed,es\na,{ed},{es}\n")
        return ["--model", str(model_dir), "--studies", str(tmp_path / "s.csv"), "--out", str(tmp_path / "p.csv")], [
            "s.csv",
            "missing column(s) ['study_id']",
        ]
    if name == "no-metadata":
        (tmp_path / "empty").mkdir()
        return [*one[2:], "--model", str(tmp_path / "empty"), "--ed", str(ed), "--es", str(es)], [METADATA_FILE]
    if name == "backbone-mismatch":
        other = save_random_backbone(tmp_path / "other.safetensors", seed=1)
        return [*one, "--weights", str(other), "--ed", str(ed), "--es", str(es)], ["other.safetensors", "--force"]
    # shape-mismatch: the recorded input contract no longer matches the model's input
    copy = shutil.copytree(model_dir, tmp_path / "model")
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["input_contract"]["spatial_shape"] = [32, 32, 8]
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    args = ["--model", str(copy), "--out", str(tmp_path / "p.json"), "--ed", str(ed), "--es", str(es)]
    return args, ["patient_example_sax_ed.nii.gz", "the model takes [64, 64, 8]", "spatial_shape"]


ERRORS = ["missing-ed", "not-3d", "shapes-differ", "csv-columns", "no-metadata", "backbone-mismatch", "shape-mismatch"]


@pytest.mark.parametrize("name", ERRORS)
def test_bad_input_is_one_error_line_and_exit_code_2(exported, cinema_examples, tmp_path, capsys, name):
    args, words = error_case(name, exported["fedit"][0], cinema_examples / "train" / "patient_example", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert predict.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert all(word in errors[0] for word in words), errors[0]
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "p.csv").exists()


def test_the_input_contract_is_the_prepared_geometry():
    contract = input_contract(CONFIG, SPACING)
    assert contract["spatial_shape"] == [*GEOMETRY.crop, GEOMETRY.depth]
    assert contract["spacing_mm"] == list(SPACING) and contract["intensity_range"] == [0.0, 1.0]
    assert dataclasses.asdict(CONFIG)["image_size"] == tuple(contract["spatial_shape"])


@pytest.mark.parametrize(
    ("ed", "study_id"),
    [
        ("scans/p42_sax_ed.nii.gz", "p42"),
        ("scans/patient001_ED.nii", "patient001"),
        ("acdc/sax_ed.nii.gz", "acdc"),
        ("scans/frame01.nii.gz", "frame01"),
    ],
)
def test_the_default_study_id_names_the_study_not_the_frame(ed, study_id):
    assert predict.study_id_of(Path(ed)) == study_id
