"""Worker processes of data_prep.prepare: exceptions cross the process boundary, results keep record order with a
bounded window, workers are recycled, and a killed worker fails the run with a message instead of hanging it."""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_prep
import data_prep.prepare as prepare
from data_prep.preprocess import Geometry
from data_prep.records import FrameRef, InputError, SubjectRecord
from tests.test_bad_input import fail_after

REPO = Path(__file__).resolve().parents[1]
KILL_TIMEOUT_S = 180


# ---- exceptions survive pickling ------------------------------------------------------------------------------------

EXCEPTION_EXAMPLES: dict[type[BaseException], BaseException] = {
    InputError: InputError(Path("/raw/patient001/patient001_frame01.nii.gz"), "header field pixdim[1] = 0.0: bad"),
    prepare.WorkerCrashError: prepare.WorkerCrashError("a worker process died; subjects in flight: acdc_patient001"),
}


def _data_prep_exception_classes() -> set[type[BaseException]]:
    """Every exception class defined in a data_prep module."""
    found = set()
    for module_info in pkgutil.walk_packages(data_prep.__path__, "data_prep."):
        module = importlib.import_module(module_info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__.startswith("data_prep."):
                found.add(value)
    return found


def test_every_data_prep_exception_has_a_pickling_example() -> None:
    assert _data_prep_exception_classes() == set(EXCEPTION_EXAMPLES)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("name", sorted(cls.__name__ for cls in EXCEPTION_EXAMPLES))
def test_exceptions_survive_pickling(name: str, protocol: int) -> None:
    original = next(error for cls, error in EXCEPTION_EXAMPLES.items() if cls.__name__ == name)
    copy = pickle.loads(pickle.dumps(original, protocol=protocol))
    assert type(copy) is type(original) and str(copy) == str(original) and copy.args == original.args
    assert vars(copy) == vars(original)
    if isinstance(original, InputError):
        assert (copy.path, copy.reason) == (original.path, original.reason)


# ---- order, bounded window, recycling ------------------------------------------------------------------------------


def _fake_records(count: int) -> list[SubjectRecord]:
    frame = FrameRef(Path("unused.nii.gz"))
    return [SubjectRecord(f"{i:03d}", "acdc", "siemens", "", "NOR", 0, frame, frame) for i in range(count)]


def _echo_subject(record: SubjectRecord, geometry: Geometry, out_root: Path) -> dict[str, object]:
    """Stands in for prepare_subject in the workers: early subjects finish last, to test the ordering."""
    time.sleep(0.02 * (3 - int(record.pid) % 4))
    return {"pid": record.pid, "worker": os.getpid()}


class _CountingExecutor(prepare.ProcessPoolExecutor):
    """ProcessPoolExecutor that counts the tasks submitted (in the parent process)."""

    submitted = 0

    def submit(self, *args: object, **kwargs: object):
        type(self).submitted += 1
        return super().submit(*args, **kwargs)


def test_results_in_record_order_with_a_bounded_window_and_recycled_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_subject is replaced by a module-level echo (picklable by reference; the fork inherits the patch)."""
    monkeypatch.setattr(prepare, "prepare_subject", _echo_subject)
    monkeypatch.setattr(prepare, "ProcessPoolExecutor", _CountingExecutor)
    monkeypatch.setattr(prepare, "MAX_TASKS_PER_WORKER", 3)
    monkeypatch.setattr(_CountingExecutor, "submitted", 0)
    records, workers, results, most_in_flight = _fake_records(20), 2, [], 0
    with fail_after(60):
        for result in prepare._results(records, Geometry(), Path("unused"), workers):
            results.append(result)
            most_in_flight = max(most_in_flight, _CountingExecutor.submitted - len(results))
    assert [r["pid"] for r in results] == [r.pid for r in records]
    assert most_in_flight <= prepare.IN_FLIGHT_PER_WORKER * workers
    batches = [results[start : start + 6] for start in range(0, 20, 6)]
    assert len({r["worker"] for r in results}) > workers and os.getpid() not in {r["worker"] for r in results}
    assert all(len({r["worker"] for r in batch}) <= workers for batch in batches)


# ---- a killed worker ------------------------------------------------------------------------------------------------

KILLER_SCRIPT = """
import os, signal, sys
import data_prep.prepare as prepare

VICTIM, PARENT = sys.argv[1], os.getpid()
real_preprocess = prepare.preprocess


def preprocess_or_die(record, geometry):
    if record.subject_id == VICTIM and os.getpid() != PARENT:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_preprocess(record, geometry)


prepare.preprocess = preprocess_or_die
sys.exit(prepare.main(sys.argv[2:]))
"""


def _run_with_deadline(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; on timeout kill the whole group (workers too) and fail the test."""
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"prepare hung for {timeout} s after a worker was killed\nstderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_killed_worker_fails_the_run_naming_the_subject(one_subject, tmp_path: Path) -> None:
    """A worker SIGKILLed mid-subject (as by the OOM killer) ends the run with exit 1 and a message, not a hang.

    Mocked: `data_prep.prepare.preprocess` is replaced, inside a child Python process and before the workers fork,
    by a wrapper that SIGKILLs the worker when it reaches the M&Ms-2 subject (a real OOM kill cannot be provoked
    reliably in a test). The workers inherit the wrapper through fork; everything else is the real CLI. The run happens
    in a subprocess so that a hang is cut by a timeout and the exit status and stderr are the real ones.
    """
    acdc_root, _, _ = one_subject("acdc")
    mnms2_root, victim_folder, _ = one_subject("mnms2")
    victim = f"mnms2_{victim_folder.name}"
    out = tmp_path / "out"
    arguments = ["--raw", str(acdc_root), "--raw", str(mnms2_root), "--out", str(out), "--workers", "2"]
    arguments += ["--crop", "32", "32", "--depth", "4", "--spacing", "4", "4", "10"]
    result = _run_with_deadline([sys.executable, "-c", KILLER_SCRIPT, victim, *arguments], KILL_TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "worker process died" in result.stderr
    assert victim in result.stderr and str(victim_folder) in result.stderr
    assert not (out / "manifest.csv").exists()
