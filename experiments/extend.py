"""Score a finished run's added test draws with the models it exported, so that a larger fixed test set needs no
retraining.

A benchmark record holds the test scores its run computed in the simulator (or in app.centralized). When the cohort
gains a test draw (BenchmarkCohortSpec.test_draws), the run's exported models (models.export: each site's
`personalised_model/`, scored as the site scored it, and the centralized `model/`) score the new subjects and
their Siemens renderings. Before a model scores anything new it must reproduce the record's own scores of the first
`VERIFY_SUBJECTS` test subjects of every site to within `VERIFY_TOLERANCE`: otherwise it is not the model the record
describes and the unit is run again instead. The record then says which draws were scored this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from data_prep.benchmark_cohort import BenchmarkCohortSpec, draw_folder, settings_draws
from data_prep.datamodule import CachedVolumes
from data_prep.report import read_manifest
from data_prep.splits import REFERENCE_SUFFIX, REFERENCE_TEST_SPLIT
from experiments.records import EXTENSION_FIELD, rounded
from experiments.runs import CENTRAL_MODEL, centralized_run_dir
from jobs.simulate import SimulatorRun
from models.convvit import PrefixFeatures
from models.dual_lora import adapters_active, backbone_of
from models.export import METADATA_FILE, load_model
from models.lit import DualLoRAClassifier
from models.prefix_cache import run_frozen_prefix

VERIFY_SUBJECTS = 8
VERIFY_TOLERANCE = 1e-4
"""Records keep 5 decimals (experiments.records.SCORE_DIGITS); a model reproducing the run's scores lands within
5e-6 of them, a different model far outside 1e-4."""
BATCH = 8
Log = Callable[[str], None]
Scores = dict[str, float]


class NotExtendable(RuntimeError):
    """A record whose added draws cannot be scored here: its run's models are gone, differ from the record, or the
    record was made with other cohort settings."""


def draws_missing(record: Mapping[str, Any], spec: BenchmarkCohortSpec) -> list[int]:
    """The test draws of `spec` that the record lacks (empty when it has them all)."""
    return list(range(settings_draws(record["cohort"]), spec.test_draws))


@dataclass(frozen=True)
class ScoredModel:
    """Where a record's model kind was exported, and whether the site scored it with its global adapter alone."""

    folder: Path
    global_only: bool = False


def scored_models(unit_dir: Path, record: Mapping[str, Any], site: str) -> dict[str, ScoredModel]:
    """How the run of a record scored each model kind of `site`, from what it exported, as app.client scores them:
    `personalised` is the site's exported model; `global` is that model with only its global adapter active where
    the method keeps private parts (the site's global-only evaluation, which keeps a private head at the site), and
    the model itself where it keeps none; `central` is app.centralized's model."""
    seed = int(record["seed"])
    kinds = record["sites"][site]["models"]
    if "central" in kinds:
        return {"central": ScoredModel(centralized_run_dir(unit_dir, seed) / CENTRAL_MODEL)}
    replica = seed if int(record["cost"]["seeds_in_job"]) > 1 else None
    run = SimulatorRun(unit_dir / "workspace", tuple(record["sites"]), 0, 0.0, (seed,) if replica is not None else ())
    folder = run.personalised_model_dir(site, replica)
    return {kind: ScoredModel(folder, global_only=kind == "global" and "personalised" in kinds) for kind in kinds}


class DrawScorer:
    """Scores test draws of one benchmark cohort with exported models, reading each site's volumes once and running
    each frozen prefix (backbone weights and first trained block) once per volume for all the models that share it.

    Not models.prefix_cache.PrefixCache: that cache keys on one module's tensors and empties itself for every newly
    loaded model, while here many separately loaded models share one prefix (keyed by the weights' sha256).
    """

    def __init__(self, cohort_dir: Path) -> None:
        self.cohort_dir = Path(cohort_dir)
        self._volumes: dict[tuple[int, str], CachedVolumes] = {}
        self._prefixes: dict[tuple[str, int], dict[str, PrefixFeatures]] = {}

    def volumes(self, draw: int, site: str) -> CachedVolumes:
        """The test and Siemens-rendering volumes of `site` in test draw `draw`."""
        key = (draw, site)
        if key not in self._volumes:
            folder = draw_folder(self.cohort_dir, draw)
            rows = [
                row
                for row in read_manifest(folder / "manifest.csv")
                if row["client"] == site and row["split"] in ("test", REFERENCE_TEST_SPLIT)
            ]
            self._volumes[key] = CachedVolumes(folder, rows, None)
        return self._volumes[key]

    @torch.inference_mode()
    def scores(self, module: DualLoRAClassifier, volumes: CachedVolumes, subjects: set[str] | None = None) -> Scores:
        """P(diseased) by subject id of the volumes (only `subjects`, given them), as the module's forward gives it:
        the frozen prefix, then the module's own suffix and head."""
        convvit = backbone_of(module.model)
        weights = str(module.export_metadata["backbone"]["sha256"])
        prefixes = self._prefixes.setdefault((weights, module.start_block), {})
        indices = [i for i, row in enumerate(volumes.rows) if subjects is None or row["subject_id"] in subjects]
        scores: Scores = {}
        for start in range(0, len(indices), BATCH):
            items = [volumes[i] for i in indices[start : start + BATCH]]
            ids = [str(item["subject_id"]) for item in items]
            missing = [i for i, subject in enumerate(ids) if subject not in prefixes]
            if missing:
                images = torch.stack([items[i]["image"] for i in missing])
                computed = run_frozen_prefix(convvit, images, module.start_block)
                for row, i in enumerate(missing):
                    prefixes[ids[i]] = PrefixFeatures(computed.tokens[row].clone(), computed.skip_tokens[row].clone())
            batch = PrefixFeatures(
                torch.stack([prefixes[subject].tokens for subject in ids]),
                torch.stack([prefixes[subject].skip_tokens for subject in ids]),
            )
            logits = convvit.forward_suffix(batch, module.start_block)
            scores.update(zip(ids, module.p_diseased(logits).tolist(), strict=True))
        return scores


def extend_record(
    record: Mapping[str, Any], spec: BenchmarkCohortSpec, scorer: DrawScorer, unit_dir: Path, log: Log = print
) -> dict[str, Any]:
    """The record with the test subjects of `spec`'s draws it lacks (in `scorer`'s cohort), scored by its run's
    exported models.

    NotExtendable when the record's cohort is not `spec` with fewer draws, a model folder is missing, or a model
    does not reproduce the record's scores.
    """
    missing = draws_missing(record, spec)
    if not missing:
        return dict(record)
    recorded = settings_draws(record["cohort"])
    if record["cohort"] != replace(spec, test_draws=recorded).settings():
        raise NotExtendable(f"its cohort settings {record['cohort']} are not {spec.settings()} with fewer draws")
    models_of = {site: scored_models(unit_dir, record, site) for site in record["sites"]}
    for site, kinds in models_of.items():
        for kind, scored in kinds.items():
            if not (scored.folder / METADATA_FILE).is_file():
                raise NotExtendable(f"{scored.folder}: no exported model of seed {record['seed']} at {site} ({kind})")
    sites = {}
    worst = 0.0
    for site, entry in record["sites"].items():
        added = [scorer.volumes(draw, site) for draw in missing]
        rows = [row for volumes in added for row in volumes.rows]
        new_ids = sorted(str(row["subject_id"]) for row in rows if row["split"] == "test")  # a run's order: by id
        labels = {str(row["subject_id"]): int(row["label"]) for row in rows}
        models = {}
        for kind, scored in models_of[site].items():
            module = load_model(scored.folder)
            alone = adapters_active(module.model, module.policy, ("global",)) if scored.global_only else nullcontext()
            with alone:
                worst = max(worst, _verified(scorer, module, entry, kind, site, scored.folder))
                scores: Scores = {}
                for volumes in added:
                    scores.update(scorer.scores(module, volumes))
            model = dict(entry["models"][kind])
            model["test"] = [*model["test"], *rounded(scores[subject] for subject in new_ids)]
            if REFERENCE_TEST_SPLIT in model:
                twins = (scores[subject + REFERENCE_SUFFIX] for subject in new_ids)
                model[REFERENCE_TEST_SPLIT] = [*model[REFERENCE_TEST_SPLIT], *rounded(twins)]
            models[kind] = model
        sites[site] = {
            **entry,
            "test_ids": [*entry["test_ids"], *new_ids],
            "test_labels": [*entry["test_labels"], *(labels[subject] for subject in new_ids)],
            "models": models,
        }
    log(f"    {record['method']} seed {record['seed']}: test draw(s) {missing} scored at {', '.join(sites)}")
    earlier = record.get(EXTENSION_FIELD, {}).get("draws", [])
    extension = {"draws": [*earlier, *missing], "max_verification_difference": worst}
    return {**record, "cohort": spec.settings(), "sites": sites, EXTENSION_FIELD: extension}


def _verified(
    scorer: DrawScorer, module: DualLoRAClassifier, entry: Mapping[str, Any], kind: str, site: str, folder: Path
) -> float:
    """The largest difference between the module's scores of the site's first test subjects and the record's;
    NotExtendable above VERIFY_TOLERANCE."""
    recorded = dict(zip(entry["test_ids"], entry["models"][kind]["test"], strict=True))
    reproduced = scorer.scores(module, scorer.volumes(0, site), set(entry["test_ids"][:VERIFY_SUBJECTS]))
    if len(reproduced) < min(VERIFY_SUBJECTS, len(recorded)):
        raise NotExtendable(f"{draw_folder(scorer.cohort_dir, 0)}: lacks the record's first test subjects at {site}")
    difference = max(abs(score - recorded[subject]) for subject, score in reproduced.items())
    if difference > VERIFY_TOLERANCE:
        raise NotExtendable(
            f"{folder}: scores the record's first test subjects at {site} {difference:.2g} away from the record "
            f"(tolerance {VERIFY_TOLERANCE}): not the model the record describes"
        )
    return difference
