"""Names the packages must agree on: sites, environment variables, files, NVFlare meta keys and metric names."""

from __future__ import annotations

# ---- sites ------------------------------------------------------------------------------------------------------
SITES = ("siemens", "philips", "ge", "canon")
"""The federated clients: one scanner vendor each, named as in the prepared manifest's `client` column."""

# ---- environment variables a site reads -------------------------------------------------------------------------
DATA_ENV = "MED_DUALLORA_DATA"
"""The prepared data root (manifest.csv + volumes) at a site; each site keeps the rows of its own name. A
`{seed}` in it is replaced by the run seed (a job of several replicas reads each replica's own root)."""
SEED_PLACEHOLDER = "{seed}"
WEIGHTS_ENV = "MED_DUALLORA_WEIGHTS"
"""The site-local CineMA checkpoint of the real job (`--weights $MED_DUALLORA_WEIGHTS`)."""
STATE_ENV = "MED_DUALLORA_STATE"
"""The folder of each site's private state across rounds and restarts (default: in the site workspace)."""

# ---- files a run writes -----------------------------------------------------------------------------------------
TEST_METRICS_FILE = "test_metrics.json"
"""A site's final evaluation, in its run directory."""
AUDIT_FILE = "received_keys.jsonl"
"""The server's record of every key list it received, in its run directory."""
GLOBAL_THRESHOLD_FILE = "global_threshold.json"
"""The global model's pooled validation threshold, beside FL_global_model.pt."""
GLOBAL_MODEL_FILE = "FL_global_model.pt"
"""NVFlare's persisted global model in the server's app folder."""
PERSONALISED_MODEL_DIR = "personalised_model"
"""A site's exported personalised model (models.export format), in its run directory."""
GLOBAL_MODEL_DIR = "global_model"
"""The server's exported global model (models.export format), in its run directory."""
NO_GLOBAL_MODEL_FILE = "NO_GLOBAL_MODEL.md"
"""What the server writes instead of a global model when the policy's shared parts are not a usable model."""
COMM_DIR = "comm"
"""The server's byte records (`bytes_up.json`, `bytes_down.json`) in its run directory."""
STATE_FILE_PATTERN = "private_state_round{:05d}.pt"
"""A site's private entries after a completed round, in its state folder (the last few rounds are kept)."""

REPLICA_PREFIX = "seed"
"""A job of several replicas (one independent federation per seed, run one after another by the same processes)
keeps each replica's outputs in `<run directory>/seed<N>/` (replica_folder)."""


def replica_folder(seed: int | None) -> str:
    """The sub-folder of a replica's outputs in a run directory: `seed<N>`, or "" for a job of one run."""
    return "" if seed is None else f"{REPLICA_PREFIX}{seed}"


# ---- meta keys and metric names exchanged with NVFlare ----------------------------------------------------------
SAMPLES_KEY = "num_train_samples"
"""Result meta: the site's training-subject count, the aggregation weight."""
FULL_MODEL_BYTES_KEY = "full_model_bytes"
"""Result meta: raw bytes of the site's model without adapters (what full-model FedAvg would send)."""
DP_EPSILON_KEY = "dp_epsilon"
"""Result metadata under DP-SGD: the ε a site has spent so far (at its configured δ), every round included."""
SHAPES_KEY = "med_duallora_shapes"
"""Task meta of an encrypted global model (custom.secure_aggregation): each key's shape, restored after decryption."""
STAGE_KEY = "evaluation_stage"
"""Task meta of the final `validate` tasks: CALIBRATE, then TEST."""
CALIBRATE, TEST = "calibrate", "test"
REPLICA_SEED_KEY = "replica_seed"
"""Task meta of a job of several replicas: the seed of the replica the task belongs to (absent otherwise)."""
GLOBAL_THRESHOLD_KEY = "global_threshold"
"""TEST task meta: the global model's pooled validation threshold (None when none could be chosen)."""
VAL_HISTOGRAM_KEY = "val_global_histogram"
"""CALIBRATE reply metric: the site's per-class histogram of the global model's validation scores."""

MIN_TRAIN_SUBJECTS = 2
"""The fewest training subjects a site (or the centralized baseline) trains on; `prepare` warns below it."""
MIN_SUBJECTS_PER_FIGURE = 5
"""No figure a site sends (a metric, a score histogram, a tracked curve) may describe fewer subjects."""
METRIC_NAMES = ("bal_acc", "sensitivity", "specificity", "auroc", "mcc", "f1")
"""Disease-detection metrics of every scored model (models.metrics.detection_metrics)."""
ROUND_METRIC = "val_bal_acc"
"""The per-round curve: balanced accuracy of each site's model validated before local training (TensorBoard tag)."""

# ---- lines a site prints for whoever watches the run ------------------------------------------------------------
PROGRESS_MARK = "med-duallora progress:"
"""Starts the line a site prints after each training epoch, e.g.
`med-duallora progress: site=ge round=2 epoch=3/20 train_loss=0.5312`; `jobs/job.py simulate` shows them."""
