"""A usable model folder (peft adapters, heads, fine-tuned blocks, metadata.json, model card): writer and reader."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, load_peft_weights, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import ConvViTConfig
from models.dual_lora import DualLoRAConfig, activate_adapters, backbone_of
from models.lit import DECISION_RULE, DualLoRAClassifier
from models.policy import SharingPolicy, adapter_of, canonical_key
from models.standin import RANDOM, STANDIN, file_sha256, resolve_backbone

__all__ = [
    "BLOCKS_FILE",
    "HEADS_FILE",
    "METADATA_FILE",
    "MODEL_SCHEMA",
    "BackboneMismatchError",
    "ModelFormatError",
    "backbone_record",
    "input_contract",
    "load_model",
    "read_metadata",
    "write_model",
]

MODEL_SCHEMA = "med-duallora/model/1"
METADATA_FILE = "metadata.json"
HEADS_FILE = "heads.safetensors"
BLOCKS_FILE = "blocks.safetensors"
CARD_FILE = "README.md"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REQUIRED_FIELDS = ("schema", "adapters", "policy", "adapter_config", "backbone", "threshold", "files")
BACKBONE_FIELDS = ("config", "weights", "sha256")
# Fields write_model computes; a caller's metadata may not set them (`backbone` only as {weights, sha256}).
COMPUTED_FIELDS = (*REQUIRED_FIELDS, "decision_rule")


class ModelFormatError(ValueError):
    """A model folder that is not a complete, intact export: the message names the file and the field."""


class BackboneMismatchError(ValueError):
    """The backbone weights at hand are not those the model was trained on (their sha256 differs)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}; pass force=True to load it anyway")
        self.detail = detail


def input_contract(config: ConvViTConfig, spacing_mm: Sequence[float]) -> dict[str, Any]:
    """What the model expects as input, as data_prep.prepare makes it (recorded in metadata.json)."""
    spacing = [float(value) for value in spacing_mm]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be three positive values (mm), got {list(spacing_mm)}")
    x, y, z = config.image_size
    return {
        "channels": ["ED", "ES"],
        "spatial_shape": [x, y, z],
        "spacing_mm": spacing,
        "intensity_range": [0.0, 1.0],
        "orientation": "voxel axes as stored: x, y in-plane, z across short-axis slices",
        "crop": (
            f"{x}x{y} in-plane window centred on the ED left ventricle (LV label map when given; else the image "
            f"centre for CineMA-preprocessed input, the centre of the ED-ES motion for raw scans); the {z} slices "
            "around the LV (else the middle ones), zero-padded at the end"
        ),
        "normalisation": (
            "per frame inside the window: min-max for CineMA-preprocessed input, clipped to the 0.95 / 99.5 "
            "percentiles for raw scans, rescaled to [0, 1], then quantised to 256 levels (uint8 / 255)"
        ),
    }


def backbone_record(weights: str | None, file: str | Path | None = None) -> dict[str, Any]:
    """write_model's `metadata["backbone_weights"]`: the `weights` argument as configured (`standin`, `random` or a
    path), the file it resolved to and that file's sha256 (None when the file is not here, e.g. at the server)."""
    token = RANDOM if weights in (None, RANDOM) else str(weights)
    if file is None and token != RANDOM:
        candidate, _ = resolve_backbone(token)
        file = candidate if token == STANDIN or Path(os.path.expandvars(candidate)).is_file() else None
    if file is not None:
        file = os.path.expandvars(str(file))
    present = file is not None and Path(file).is_file()
    return {"as_configured": token, "file": file, "sha256": file_sha256(Path(file)) if present else None}


# ---- writing ---------------------------------------------------------------------------------------------------


def write_model(
    out_dir: str | Path,
    model: nn.Module,
    policy: SharingPolicy,
    adapter_config: DualLoRAConfig,
    adapters: Sequence[str],
    threshold: float,
    metadata: Mapping[str, Any],
) -> Path:
    """Write `model` (a PeftModel, or the bare ConvViT of fedavg_full) with `adapters` active to `out_dir`, atomically.

    Only the trained parts are written (the frozen backbone never is): one peft folder per active adapter, the heads,
    and for fedavg_full its fine-tuned blocks. `metadata["backbone_weights"]` (`backbone_record`) says which backbone
    weights the model runs on; all of `metadata` is recorded. The folder is built as a hidden sibling and renamed
    over `out_dir` once complete (metadata.json last); a crash leaves the old folder in place, or, between the two
    renames, inside the hidden sibling.
    """
    out = Path(out_dir)
    adapters = tuple(adapters)
    _check_adapters(policy, adapters, model, out)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"{out}: threshold must be in [0, 1], got {threshold}")
    reserved = sorted(set(metadata) & set(COMPUTED_FIELDS))
    if reserved:
        raise ValueError(f"{out}: metadata may not set the computed field(s) {reserved}")
    backbone = backbone_of(model)
    record = {
        **_json_safe(metadata),
        "schema": MODEL_SCHEMA,
        "adapters": list(adapters),
        "policy": policy.to_dict(),
        "adapter_config": dataclasses.asdict(adapter_config),
        "backbone": {"config": _json_safe(dataclasses.asdict(backbone.config)), **_weights_of(metadata, out)},
        "threshold": float(threshold),
        "decision_rule": DECISION_RULE,
    }
    if out.exists() and not (out / METADATA_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not a model folder (no {METADATA_FILE}); not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        built = staging / "model"
        built.mkdir()
        if adapters:  # peft puts an adapter not named `default` in a subfolder of its name: global/, local/
            model.save_pretrained(str(built), selected_adapters=list(adapters))
        save_file(_part_state(backbone, policy, "head"), str(built / HEADS_FILE), metadata={"format": "pt"})
        if policy.full_blocks:
            save_file(_part_state(backbone, policy, "block"), str(built / BLOCKS_FILE), metadata={"format": "pt"})
        (built / CARD_FILE).write_text(model_card(record), encoding="utf-8")  # replaces peft's own README.md
        record["files"] = {
            path.relative_to(built).as_posix(): file_sha256(path)
            for path in sorted(built.rglob("*"))
            if path.is_file()
        }
        (built / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_tree(built)
        if out.exists():
            os.replace(out, staging / "retired")
        os.replace(built, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_adapters(policy: SharingPolicy, adapters: tuple[str, ...], model: nn.Module, out: Path) -> None:
    if not policy.adapters:
        if adapters:
            raise ValueError(f"{out}: policy {policy.name} has no adapters, got adapters {list(adapters)}")
        return
    if not adapters or not set(adapters) <= set(policy.adapters) or len(set(adapters)) != len(adapters):
        raise ValueError(f"{out}: adapters {list(adapters)} must be some of policy {policy.name}'s {policy.adapters}")
    if not isinstance(model, PeftModel):
        raise TypeError(f"{out}: policy {policy.name} has adapters but the model is a {type(model).__name__}")


def _weights_of(metadata: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """`{weights, sha256}` of the caller's `backbone_weights` (backbone_record)."""
    given = metadata.get("backbone_weights")
    if not isinstance(given, Mapping) or "as_configured" not in given or "sha256" not in given:
        raise ValueError(
            f"{out}: metadata field backbone_weights must give as_configured and sha256 (see backbone_record)"
        )
    weights = given["as_configured"]
    return {"weights": RANDOM if weights is None else str(weights), "sha256": given["sha256"]}


def _part_state(backbone: nn.Module, policy: SharingPolicy, part: str) -> dict[str, torch.Tensor]:
    """The backbone's entries of one policy part (`head`, `block`), under backbone-relative keys."""
    state = {
        canonical_key(key): value.detach().to("cpu").contiguous()
        for key, value in backbone.state_dict().items()
        if policy.part(key) == part
    }
    if not state:
        raise ValueError(f"the model has no {part} parameters under policy {policy.name}")
    return state


def _json_safe(value: Any) -> Any:
    """`value` with tuples as lists and non-finite floats as None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def _fsync_dir(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (the rename then publishes complete contents)."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(root)


# ---- the model card ----------------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


CARD_METRICS = ("auroc", "bal_acc", "sensitivity", "specificity")


def _metric_rows(split: str, group: str, scores: Any) -> list[str]:
    """Markdown rows `| split | group | n | AUROC | ... |`: one per mapping holding scores, found at any depth
    (flat, {pooled, clients: {site: ...}} or {site: ...}); `clients` itself names no group."""
    if not isinstance(scores, Mapping):
        return []
    if any(name in scores for name in (*CARD_METRICS, "n")):
        cells = " | ".join(_number(scores.get(name)) for name in CARD_METRICS)
        return [f"| {split} | {group or 'all'} | {scores.get('n', 'n/a')} | {cells} |"]
    return [
        row
        for key, value in scores.items()
        for row in _metric_rows(split, group if key == "clients" else str(key), value)
    ]


def model_card(record: Mapping[str, Any]) -> str:
    """The folder's README.md: what the model is, its use, input, threshold, scores, limits and how to run it."""
    policy, backbone = record["policy"], record["backbone"]
    config = backbone["config"]
    size = f"embed {config['embed_dim']}, depth {config['depth']}, {config['n_heads']} heads"
    if record["adapters"]:
        trained = "LoRA adapter(s) " + " + ".join(f"`{name}`" for name in record["adapters"])
        stored = "the adapters and the classification heads"
    else:
        trained = f"encoder blocks {policy['full_blocks']} fully fine-tuned"
        stored = "the fine-tuned blocks and the classification heads"
    contract = record.get("input_contract")
    lines = [
        f"# med-duallora model: {record.get('kind', 'model')}"
        + (f", site `{record['site']}`" if record.get("site") else ""),
        "",
        f"A CineMA ConvViT ({size}) with {trained}, trained under the `{policy['name']}` sharing policy; "
        f"round {record.get('round', 'n/a')}. Backbone weights: `{backbone['weights']}` (sha256 "
        f"{backbone['sha256'] or 'not recorded'}), not included: this folder holds only {stored}.",
        "",
        "## Intended use",
        "",
        "Research only: binary detection of cardiac disease (NOR = healthy vs any pathology = diseased) on short-axis "
        "cine MRI at end-diastole (ED) and end-systole (ES). **Not for clinical use.**",
        "",
        "## Input",
        "",
    ]
    if isinstance(contract, Mapping):
        lines += [
            f"- {key}: {json.dumps(value) if not isinstance(value, str) else value}" for key, value in contract.items()
        ]
    else:
        lines.append("- not recorded (see `backbone.config.image_size` in metadata.json)")
    lines += [
        "",
        "## Decision",
        "",
        f"Threshold {record['threshold']:.4f} ({record.get('threshold_source', 'source not recorded')}): "
        f"{record['decision_rule']}.",
        "",
        "## Scores",
        "",
    ]
    metrics = record.get("metrics")
    rows = [row for split, scores in (metrics or {}).items() for row in _metric_rows(split, "", scores)]
    if rows:
        lines += [
            "| split | group | n | AUROC | bal_acc | sensitivity | specificity |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += rows
        lines += ["", "Threshold metrics at the threshold above; n = subjects scored."]
    else:
        lines.append("No scores recorded.")
    lines += ["", "## Limits", ""]
    if backbone["weights"] == STANDIN:
        lines.append(
            "- Trained on synthetic data with the committed stand-in backbone: **the stand-in backbone is NOT "
            "CineMA**; the scores say nothing about real patients."
        )
    if backbone["weights"] == RANDOM:
        lines.append("- Random backbone: its weights were not saved, so this model cannot be reloaded faithfully.")
    lines += [
        "- Few subjects per site: wide confidence intervals and a noisy validation threshold.",
        "- Scanner vendor shift: expect lower scores on vendors or protocols not seen in training.",
        "",
        "## Use",
        "",
        "```bash",
        "python -m app.predict --model THIS_FOLDER --ed ED.nii.gz --es ES.nii.gz --out prediction.json",
        "python -m app.predict --model THIS_FOLDER --studies studies.csv --out predictions.csv  # study_id,ed,es",
        "```",
        "",
        "Add `--weights FILE` when the backbone is not where `backbone.weights` says; `--input raw` for scanner NIfTI "
        "(default: CineMA-preprocessed input). In Python: `models.export.load_model(THIS_FOLDER)`. The `global/` and "
        "`local/` folders load with plain peft: `PeftModel.from_pretrained(convvit, THIS_FOLDER/'global', "
        "adapter_name='global')`, then `.load_adapter(THIS_FOLDER/'local', adapter_name='local')`.",
        "",
    ]
    return "\n".join(lines)


# ---- reading ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    """metadata.json's fields as objects."""

    adapters: tuple[str, ...]
    policy: SharingPolicy
    adapter_config: DualLoRAConfig
    config: ConvViTConfig
    weights: str
    sha256: str | None
    threshold: float
    files: dict[str, str]


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """metadata.json of a model folder, checked field by field (ModelFormatError naming the file and field)."""
    return _read(Path(model_dir))[0]


def _read(model_dir: Path) -> tuple[dict[str, Any], _Parsed]:
    path = model_dir / METADATA_FILE
    if not path.is_file():
        raise ModelFormatError(f"{path}: missing: {model_dir} is not a model folder written by models.export")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"{path}: unreadable JSON ({type(error).__name__}: {error})") from error
    if not isinstance(record, dict):
        raise ModelFormatError(f"{path}: must hold a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ModelFormatError(f"{path}: missing field(s) {missing}")
    if record["schema"] != MODEL_SCHEMA:
        raise ModelFormatError(f"{path}: field schema is {record['schema']!r}, expected {MODEL_SCHEMA!r}")
    backbone = record["backbone"]
    if not isinstance(backbone, dict) or any(name not in backbone for name in BACKBONE_FIELDS):
        raise ModelFormatError(f"{path}: field backbone must have {list(BACKBONE_FIELDS)}, got {backbone!r}")
    try:
        policy = SharingPolicy.from_dict(record["policy"], source=f"{path} field policy")
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFormatError(f"{path}: field policy: {error}") from error
    adapter_config = _construct(DualLoRAConfig, record["adapter_config"], path, "adapter_config")
    config = _construct(ConvViTConfig, backbone["config"], path, "backbone.config")
    adapters = record["adapters"]
    expected_some = bool(policy.adapters)
    if (
        not isinstance(adapters, list)
        or not set(adapters) <= set(policy.adapters)
        or bool(adapters) != expected_some
        or len(set(adapters)) != len(adapters)
    ):
        raise ModelFormatError(
            f"{path}: field adapters {adapters!r} is not a set of policy adapters {policy.adapters}"
        )
    threshold = record["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ModelFormatError(f"{path}: field threshold must be a number in [0, 1], got {threshold!r}")
    files = record["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ModelFormatError(f"{path}: field files must map relative paths to sha256 strings")
    weights, sha256 = backbone["weights"], backbone["sha256"]
    if not isinstance(weights, str) or not (sha256 is None or isinstance(sha256, str)):
        raise ModelFormatError(f"{path}: fields backbone.weights (a string) / backbone.sha256 (string or null)")
    parsed = _Parsed(tuple(adapters), policy, adapter_config, config, weights, sha256, float(threshold), files)
    return record, parsed


def _construct(cls: type, fields: Any, path: Path, name: str) -> Any:
    if not isinstance(fields, dict):
        raise ModelFormatError(f"{path}: field {name} must be an object, got {type(fields).__name__}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:
        raise ModelFormatError(f"{path}: field {name}: {error}") from error


def _required_files(parsed: _Parsed) -> list[str]:
    files = [f"{adapter}/{name}" for adapter in parsed.adapters for name in ADAPTER_FILES] + [HEADS_FILE]
    return files + ([BLOCKS_FILE] if parsed.policy.full_blocks else [])


def _check_files(model_dir: Path, parsed: _Parsed) -> None:
    """Every file listed in `files` is there, inside the folder, with its sha256; every needed file is listed."""
    where = model_dir / METADATA_FILE
    unlisted = [name for name in _required_files(parsed) if name not in parsed.files]
    if unlisted:
        raise ModelFormatError(f"{where}: field files does not list {unlisted}, which this model needs")
    root = model_dir.resolve()
    for name, expected in sorted(parsed.files.items()):
        path = (model_dir / name).resolve()
        if not path.is_relative_to(root) or path == root:
            raise ModelFormatError(f"{where}: field files entry {name!r} points outside {model_dir}")
        if not path.is_file():
            raise ModelFormatError(f"{model_dir / name}: missing (listed in {where} field files)")
        actual = file_sha256(path)
        if actual != expected:
            raise ModelFormatError(
                f"{model_dir / name}: sha256 {actual} differs from {expected} in {where} field files "
                "(the file was modified or corrupted)"
            )


def _backbone_file(parsed: _Parsed, weights: str | None, force: bool, where: Path) -> str | None:
    """The backbone weights file to build on, after comparing its sha256 with the recorded one."""
    token = parsed.weights if weights is None else str(weights)
    path, _ = resolve_backbone(token if token in (STANDIN, RANDOM) else os.path.expandvars(token))
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: backbone weights not found (recorded in {where} field backbone.weights = {parsed.weights!r}); "
            "give the file's location as weights"
        )
    actual = file_sha256(Path(path)) if path is not None else None
    if parsed.sha256 is None:
        warnings.warn(
            f"{where}: field backbone.sha256 is null: the backbone {path or RANDOM} cannot be verified",
            UserWarning,
            stacklevel=3,
        )
    elif actual != parsed.sha256:
        message = (
            f"{path or RANDOM}: backbone sha256 {actual} differs from {parsed.sha256} recorded in {where} field "
            "backbone.sha256: the model was trained on another backbone"
        )
        if not force:
            raise BackboneMismatchError(message)
        warnings.warn(message + "; loading anyway (force)", UserWarning, stacklevel=3)
    return path


def load_model(model_dir: str | Path, weights: str | None = None, force: bool = False) -> DualLoRAClassifier:
    """The exported model as a DualLoRAClassifier in eval mode, with its recorded adapters active and threshold set.

    `weights` overrides the recorded backbone (`standin`, `random` or a path); its sha256 must be the recorded one
    unless `force`. Every file is checked against metadata.json's `files`. metadata.json is `module.export_metadata`.
    """
    model_dir = Path(model_dir)
    record, parsed = _read(model_dir)
    _check_files(model_dir, parsed)
    backbone_file = _backbone_file(parsed, weights, force, model_dir / METADATA_FILE)
    classes = record.get("classes")
    module = DualLoRAClassifier(
        backbone_overrides=dataclasses.asdict(parsed.config),
        weights=backbone_file or RANDOM,
        adapter=parsed.adapter_config,
        policy=parsed.policy,
        task="multiclass" if classes else "binary",
        classes=classes,
    )
    for adapter in parsed.adapters:
        _load_adapter(module.model, adapter, model_dir / adapter)
    backbone = backbone_of(module.model)
    _load_part(backbone, parsed.policy, "head", model_dir / HEADS_FILE)
    if parsed.policy.full_blocks:
        _load_part(backbone, parsed.policy, "block", model_dir / BLOCKS_FILE)
    if parsed.policy.adapters:
        activate_adapters(module.model, parsed.policy, parsed.adapters)
    module.thresholds["model"] = parsed.threshold
    module.export_metadata = record
    return module.eval()


def _load_adapter(model: nn.Module, adapter: str, folder: Path) -> None:
    """One peft adapter folder into `model`'s adapter of that name; its config and keys must match exactly."""
    saved = PeftConfig.from_pretrained(str(folder))
    own = model.peft_config[adapter]
    for field in ("peft_type", "r", "lora_alpha", "bias", "use_dora", "use_rslora"):
        if getattr(saved, field, None) != getattr(own, field, None):
            raise ModelFormatError(
                f"{folder / ADAPTER_FILES[0]}: field {field} is {getattr(saved, field, None)!r}, the model's "
                f"{adapter} adapter has {getattr(own, field, None)!r}"
            )
    if set(saved.target_modules) != set(own.target_modules):
        raise ModelFormatError(
            f"{folder / ADAPTER_FILES[0]}: field target_modules {sorted(saved.target_modules)} differs from the "
            f"model's {sorted(own.target_modules)}"
        )
    try:
        state = load_peft_weights(str(folder), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ModelFormatError(f"{folder / ADAPTER_FILES[1]}: unreadable ({error})") from error
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    expected = {key for key in model.state_dict() if adapter_of(key) == adapter}
    missing = sorted(key for key in result.missing_keys if key in expected)
    if missing or result.unexpected_keys or len(state) != len(expected):
        raise ModelFormatError(
            f"{folder / ADAPTER_FILES[1]}: keys do not match the {adapter} adapter (missing {missing[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}, {len(state)} tensors for {len(expected)})"
        )


def _load_part(backbone: nn.Module, policy: SharingPolicy, part: str, path: Path) -> None:
    """A safetensors file of one policy part into the backbone; its keys must be exactly that part's."""
    try:
        saved = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ModelFormatError(f"{path}: unreadable ({error})") from error
    own = {canonical_key(key): key for key in backbone.state_dict() if policy.part(key) == part}
    if set(saved) != set(own):
        raise ModelFormatError(f"{path}: keys {sorted(set(saved) ^ set(own))[:5]} differ from the model's {part} keys")
    current = backbone.state_dict()
    for key, value in saved.items():
        if tuple(value.shape) != tuple(current[own[key]].shape):
            raise ModelFormatError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(current[own[key]].shape)}"
            )
    backbone.load_state_dict({own[key]: value for key, value in saved.items()}, strict=False)
