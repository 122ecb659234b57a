"""Shared fixtures: one torch thread, the CineMA fixture folder, a tiny synthetic cohort and its prepared root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
from nvflare.apis.client import Client
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from data_prep.prepare import run_prepare
from data_prep.preprocess import Geometry
from data_prep.synthesize import synthesize
from jobs.processes import processes_in
from jobs.simulate import SimulatorRun, run_simulator, simulator_command
from models.protocol import DATA_ENV, SITES, STATE_ENV

SUBJECTS_PER_VENDOR = 6
TEST_GEOMETRY = Geometry(crop=(64, 64), spacing=(3.0, 3.0, 10.0), depth=8)  # the stand-in backbone's input


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the CPU is shared, and oversubscribed OpenMP threads slow these small ops several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cinema_fixtures() -> Path:
    """The CineMA fixture folder: $MED_DUALLORA_CINEMA_FIXTURES, tests/fixtures/cinema or ../shared/fixtures/cinema."""
    repo = Path(__file__).resolve().parents[1]
    env = os.environ.get("MED_DUALLORA_CINEMA_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates += [
        repo / "tests" / "fixtures" / "cinema",
        repo / "shared" / "fixtures" / "cinema",
        repo.parent / "shared" / "fixtures" / "cinema",
    ]
    for candidate in candidates:
        if (candidate / "README.md").is_file():
            return candidate
    pytest.fail(f"CineMA fixtures not found in {[str(c) for c in candidates]}")


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw root with ACDC/, MnM/ and MnM2/ in the real layouts: 6 subjects per vendor, seed 0. Treat as read-only."""
    raw = tmp_path_factory.mktemp("synthetic_raw")
    synthesize(raw, seed=0, subjects_per_vendor=SUBJECTS_PER_VENDOR, workers=2)
    return raw


@pytest.fixture(scope="session")
def prepared_root(synthetic_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared root (manifest.csv + volumes) of `synthetic_raw`: 64×64×8 at 3×3×10 mm, split seed 0. Read-only."""
    out = tmp_path_factory.mktemp("prepared_root")
    result = run_prepare([synthetic_raw], out, seed=0, geometry=TEST_GEOMETRY, workers=2)
    assert not result.problems, result.problems
    return out


def _copy_with_csv(folder: Path, csv_path: Path, key_column: int, key: str, destination: Path) -> tuple[Path, Path]:
    """Copy one subject folder and a metadata CSV reduced to its header and that subject's row."""
    target = destination / folder.name
    shutil.copytree(folder, target)
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    rows = [line for line in lines[1:] if line.split(",")[key_column].lstrip("0") == key.lstrip("0")]
    new_csv = destination / csv_path.name
    new_csv.write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")
    return target, new_csv


@pytest.fixture
def one_subject(synthetic_raw: Path, tmp_path: Path):
    """Factory: `one_subject(dataset)` copies one annotated subject of `synthetic_raw` into a fresh raw root.

    Returns (raw_root, subject_folder, metadata_file): Info.cfg for ACDC, the reduced CSV for M&Ms-1 / M&Ms-2.
    """

    def make(dataset: str) -> tuple[Path, Path, Path]:
        root = tmp_path / f"raw_{dataset}"
        if dataset == "acdc":
            folder = sorted((synthetic_raw / "ACDC" / "database" / "training").iterdir())[0]
            target = root / "ACDC" / "training" / folder.name
            shutil.copytree(folder, target)
            return root, target, target / "Info.cfg"
        if dataset == "mnms":
            mnms_root = synthetic_raw / "MnM" / "OpenDataset"
            folder = sorted((mnms_root / "Testing").iterdir())[0]
            csv_path = next(mnms_root.glob("*M&Ms_Dataset_*.csv"))
            destination = root / "OpenDataset"
            (destination / "Testing").mkdir(parents=True)
            target, new_csv = _copy_with_csv(folder, csv_path, 1, folder.name, destination / "Testing")
            return root, target, new_csv.replace(destination / new_csv.name)
        folder = sorted((synthetic_raw / "MnM2" / "dataset").iterdir())[0]
        (root / "MnM2" / "dataset").mkdir(parents=True)
        csv_path = synthetic_raw / "MnM2" / "dataset_information.csv"
        target, new_csv = _copy_with_csv(folder, csv_path, 0, folder.name, root / "MnM2" / "dataset")
        return root, target, new_csv.replace(root / "MnM2" / new_csv.name)

    return make


EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cinema_examples"
# The examples' true pathologies are not published with them: the codes below are placeholders for the smoke test.
EXAMPLE_ROWS = {
    "acdc": ("patient_example", "", "DCM"),
    "mnms": ("mnms_example", "A", "HCM"),
    "mnms2": ("mnms2_example", "SIEMENS", "NOR"),
}


@pytest.fixture
def cinema_examples(tmp_path: Path) -> Path:
    """The three real CineMA-preprocessed subjects in CineMA's layout: {pid}/{pid}_sax_{ed,es}.nii.gz plus a CSV."""
    if not EXAMPLES.is_dir():
        pytest.skip(f"real examples not found at {EXAMPLES}")
    root = tmp_path / "cinema_processed"
    lines = ["pid,pathology,vendor,n_slices"]
    for dataset, (pid, vendor, pathology) in EXAMPLE_ROWS.items():
        (root / "train" / pid).mkdir(parents=True)
        for phase in ("ed", "es"):
            shutil.copy(EXAMPLES / dataset / f"sax_{phase}.nii.gz", root / "train" / pid / f"{pid}_sax_{phase}.nii.gz")
        lines.append(f"{pid},{pathology},{vendor},0")
    (root / "train_metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def _site_env(prepared_root: Path, state_root: Path) -> dict[str, str]:
    return {DATA_ENV: str(prepared_root), STATE_ENV: str(state_root)}


@pytest.fixture(scope="session")
def simulate_sites(prepared_root: Path) -> Callable[..., SimulatorRun]:
    """Runs a job folder in the real NVFlare simulator: four vendor sites as 4 threads over `prepared_root`. A run
    lost to a port clash is run again (run_simulator); the retry clears the sites' state only when it is the
    fixture's own `root/site_state`, never a `state_root` the caller passes (a resumed run reads an earlier run's)."""

    def run(job_dir: Path, root: Path, state_root: Path | None = None) -> SimulatorRun:
        own_state = root / "site_state"
        env = _site_env(prepared_root, state_root or own_state)
        return run_simulator(
            job_dir,
            root / "ws",
            SITES,
            threads=4,
            env=env,
            timeout=900,
            log_file=root / "sim.log",
            clear_before_retry=[] if state_root else [own_state],
        )

    return run


@pytest.fixture(scope="session")
def simulate_until_killed(prepared_root: Path) -> Callable[..., Path]:
    """Starts the simulator as `simulate_sites` does and SIGKILLs all of it (server and sites share its process
    tree) the moment `kill_now(workspace)` holds; returns the workspace. Fails when the run ends first."""

    def run(job_dir: Path, root: Path, state_root: Path, kill_now: Callable[[Path], bool]) -> Path:
        workspace = root / "ws"
        command, env = simulator_command(job_dir, workspace, SITES, 4, _site_env(prepared_root, state_root))
        with open(root / "sim.log", "w") as log:
            simulator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while not kill_now(workspace):
            assert simulator.poll() is None, "the run ended before the moment to kill it"
            assert time.monotonic() < deadline, "the moment to kill the run never came"
            time.sleep(0.1)
        tree = [simulator, *processes_in(workspace)]
        for process in tree:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        simulator.wait()
        psutil.wait_procs(processes_in(workspace), timeout=30)
        return workspace

    return run


class _ServerEngine:
    """The engine calls an aggregator makes, backed by a real NVFlare Workspace and Client objects."""

    def __init__(self, root: str, sites: tuple[str, ...]):
        for folder in ("startup", "local"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        self.workspace = Workspace(root_dir=root, site_name="server")
        self.clients = [Client(name, token=name) for name in sites]

    def get_workspace(self) -> Workspace:
        return self.workspace

    def get_clients(self) -> list[Client]:
        return self.clients

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Log events (warnings, errors) have no listener here."""


@pytest.fixture
def server_context() -> Callable[..., FLContext]:
    """`make(root, sites, current_round)`: an aggregator's FLContext in round `current_round` of job `job1`, its
    workspace in `root` (the audit file goes to `root/job1/`). NVFlare's server engine cannot exist outside a running
    server: `_ServerEngine` stands in for the three calls an aggregator makes."""

    def make(root: Path, sites: tuple[str, ...] = SITES, current_round: int = 2) -> FLContext:
        ctx = FLContext()
        ctx.set_prop(ReservedKey.ENGINE, _ServerEngine(str(root), tuple(sites)), private=True, sticky=False)
        ctx.set_prop(ReservedKey.RUN_NUM, "job1", private=False, sticky=True)
        ctx.set_prop(AppConstants.CURRENT_ROUND, current_round, private=True, sticky=False)
        (Path(root) / "job1").mkdir(parents=True, exist_ok=True)
        return ctx

    return make


@pytest.fixture
def filter_chains() -> Callable[[Path], dict[tuple[str, str, str], list[str]]]:
    """`chains(job_dir)`: the filter class names of an exported job, in order, by (side, filter kind, task)."""

    def chains(job_dir: Path) -> dict[tuple[str, str, str], list[str]]:
        found: dict[tuple[str, str, str], list[str]] = {}
        for side in ("client", "server"):
            config = json.loads((job_dir / "app" / "config" / f"config_fed_{side}.json").read_text())
            for kind in ("task_data_filters", "task_result_filters"):
                for chain in config[kind]:
                    names = [entry["path"].rsplit(".", 1)[-1] for entry in chain["filters"]]
                    for task in chain["tasks"]:
                        found.setdefault((side, kind, task), []).extend(names)
        return found

    return chains
