"""The benchmark runner resumes: finished (method, seed) runs are skipped, unfinished ones are redone from scratch.

The NVFlare simulator run is replaced by a fake run function: the real one is exercised by the federation tests, and
here only the runner's bookkeeping (markers, resume, configuration check, outputs) is under test.
"""

import csv
import json

import pytest

from experiments.benchmark import MARKER_NAME, ConfigurationMismatch, build_specs, check_configuration, run_pending
from experiments.report import write_report

SITES = ("siemens", "philips", "ge", "canon")


def fake_record(method: str, seed: int) -> dict:
    """A run record whose scores depend on method, seed and site, like a real one would."""
    offset = {"med_duallora": 0.3, "fedit": 0.1}.get(method, 0.0)
    evaluations = []
    for site_index, site in enumerate(SITES):
        labels = [0, 0, 1, 1, 1]
        noise = 0.02 * (seed + site_index)
        scores = [0.45 - offset + noise, 0.3, 0.4 + offset, 0.7, 0.2 + offset + noise]
        evaluations.append({"site": site, "model_kind": "personalised", "labels": labels, "scores": scores})
    return {
        "evaluations": evaluations,
        "not_evaluable": {"global": "server model has B = 0"},
        "rounds": [{"round": r, "site": site, "bal_acc": 0.5 + 0.05 * r} for r in range(3) for site in SITES],
        "communication": {"bytes_sent_total": 1000 * (seed + 1), "bytes_sent_per_client_round": 100.0},
        "params": {"trainable": 10, "shared": 5, "total": 100},
        "rounds_completed": 3,
    }


class FakeRuns:
    """Records which specs ran; can fail (like an interrupted run) on a chosen spec after leaving a partial file."""

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.calls: list[str] = []

    def __call__(self, spec, run_dir):
        self.calls.append(spec.run_id)
        (run_dir / "partial.txt").write_text("work in progress")
        if spec.run_id == self.fail_on:
            raise KeyboardInterrupt
        return fake_record(spec.method, spec.seed)


def test_resume_skips_finished_runs_and_redoes_the_interrupted_one(tmp_path):
    specs = build_specs(["med_duallora", "fedit"], [0, 1])
    assert [spec.run_id for spec in specs] == [
        "med_duallora__seed0",
        "fedit__seed0",
        "med_duallora__seed1",
        "fedit__seed1",
    ]
    interrupted = FakeRuns(fail_on="med_duallora__seed1")
    with pytest.raises(KeyboardInterrupt):
        run_pending(specs, tmp_path, interrupted, log=lambda message: None)
    assert interrupted.calls == ["med_duallora__seed0", "fedit__seed0", "med_duallora__seed1"]
    assert not (tmp_path / "runs" / "med_duallora__seed1" / MARKER_NAME).exists()

    resumed = FakeRuns()
    messages: list[str] = []
    records = run_pending(specs, tmp_path, resumed, log=messages.append).records
    assert resumed.calls == ["med_duallora__seed1", "fedit__seed1"]
    assert [(record["method"], record["seed"]) for record in records] == [(s.method, s.seed) for s in specs]
    assert sum("skipped" in message for message in messages) == 2
    assert any("removing the unfinished run" in message for message in messages)

    again = FakeRuns()
    run_pending(specs, tmp_path, again, log=lambda message: None)
    assert again.calls == []
    leftovers = [path.name for path in (tmp_path / "runs").rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []


def test_marker_must_match_its_run(tmp_path):
    specs = build_specs(["fedit"], [0])
    run_pending(specs, tmp_path, FakeRuns(), log=lambda message: None)
    marker = tmp_path / "runs" / "fedit__seed0" / MARKER_NAME
    marker.write_text(json.dumps({"method": "fedit", "seed": 5}))
    with pytest.raises(ValueError, match="fields method/seed"):
        run_pending(specs, tmp_path, FakeRuns(), log=lambda message: None)


def test_resuming_with_another_configuration_is_refused(tmp_path):
    check_configuration(tmp_path, {"rounds": 3, "seeds": [0, 1, 2]})
    check_configuration(tmp_path, {"rounds": 3, "seeds": [0, 1, 2]})
    with pytest.raises(ConfigurationMismatch, match="differs in rounds"):
        check_configuration(tmp_path, {"rounds": 5, "seeds": [0, 1, 2]})


def test_outputs_after_resume_cover_every_run(tmp_path):
    specs = build_specs(["med_duallora", "fedit", "fedsa_lora"], [0, 1, 2])
    records = run_pending(specs, tmp_path, FakeRuns(), log=lambda message: None).records
    write_report(records, tmp_path, {"fedit": "FedAvg-LoRA"}, ["# Benchmark"], log=lambda message: None)
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # 3 methods x 3 seeds x (4 sites + pooled) x 1 model kind.
    assert len(rows) == 45
    assert {row["site"] for row in rows} == {*SITES, "pooled"}
    summary = (tmp_path / "summary.md").read_text()
    assert "| fedit |" in summary and "not evaluable: server model has B = 0" in summary
    assert "## Significance" in summary
    for name in ("bal_acc_per_round.png", "bal_acc_vs_bytes.png", "bal_acc_per_site.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_keep_going_records_a_failed_run_and_redoes_it_next_time(tmp_path):
    specs = build_specs(["med_duallora", "fedit"], [0])

    def broken_fedit(spec, run_dir):
        if spec.method == "fedit":
            raise RuntimeError("simulator exited with 2")
        return fake_record(spec.method, spec.seed)

    progress = run_pending(specs, tmp_path, broken_fedit, log=lambda message: None, keep_going=True)
    assert [record["method"] for record in progress.records] == ["med_duallora"]
    assert [(spec.run_id, message) for spec, message in progress.failed] == [
        ("fedit__seed0", "RuntimeError: simulator exited with 2")
    ]
    assert (tmp_path / "runs" / "fedit__seed0" / "error.txt").exists()
    assert not (tmp_path / "runs" / "fedit__seed0" / MARKER_NAME).exists()

    retried = FakeRuns()
    progress = run_pending(specs, tmp_path, retried, log=lambda message: None, keep_going=True)
    assert retried.calls == ["fedit__seed0"]
    assert progress.failed == []


def test_client_reported_metrics_give_site_rows_without_a_computed_pooled_row():
    from experiments.report import result_rows

    metrics = {"bal_acc": 0.75, "sensitivity": 1.0, "specificity": 0.5, "auroc": 0.9, "mcc": 0.5, "f1": 0.8}
    record = fake_record("fedit", 0) | {"method": "fedit", "seed": 0}
    record["evaluations"] = [{"site": site, "model_kind": "global", "metrics": metrics, "n": 4} for site in SITES]
    rows = result_rows([record])
    assert [row["site"] for row in rows] == list(SITES)
    assert all(row["bal_acc"] == 0.75 and row["n_test"] == 4 for row in rows)
