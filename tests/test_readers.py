"""Readers: generator → readers round trip for each layout, and one test per layout quirk."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.nifti import read_frames
from data_prep.readers import acdc, discover, mnms, mnms2
from data_prep.readers.common import list_files
from data_prep.records import LV_LABEL, RV_LABEL, LabelRule, parse_label_overrides
from data_prep.synthesize import plan_cohort
from tests.conftest import SUBJECTS_PER_VENDOR
from tests.test_bad_input import fail_after


@pytest.fixture(scope="module")
def found(synthetic_raw: Path):
    return discover([synthetic_raw], LabelRule())


def _expected(dataset: str) -> Counter:
    return Counter(
        (f"{dataset}_{p.pid}", p.vendor, p.pathology)
        for p in plan_cohort(0, SUBJECTS_PER_VENDOR)
        if p.dataset == dataset
    )


@pytest.mark.parametrize("dataset", ["acdc", "mnms", "mnms2"])
def test_round_trip_each_layout(found, dataset: str) -> None:
    assert not found.problems
    records = [r for r in found.records if r.dataset == dataset]
    assert Counter((r.subject_id, r.vendor, r.pathology) for r in records) == _expected(dataset)
    for record in records:
        assert record.label == (0 if record.pathology == "NOR" else 1)
        (ed, es), _ = read_frames([record.ed_image, record.es_image], is_label=False)
        assert ed.dtype == np.float32 and ed.shape == es.shape and not np.array_equal(ed, es)


def test_every_vendor_client_is_found(found) -> None:
    assert Counter(r.client for r in found.records) == dict.fromkeys(["siemens", "philips", "ge", "canon"], 6)
    assert {r.vendor for r in found.records if r.dataset == "acdc"} == {"siemens"}


def test_acdc_frames_are_one_based(found) -> None:
    record = next(r for r in found.records if r.dataset == "acdc")
    fields = acdc.parse_info_cfg(record.source / "Info.cfg")
    assert record.ed_image.path.name == f"{record.pid}_frame{int(fields['ED']):02d}.nii.gz"
    (ed,), _ = read_frames([record.ed_image], is_label=False)
    cine = nib.load(record.source / f"{record.pid}_4d.nii.gz").get_fdata(dtype=np.float32)
    assert np.array_equal(ed, cine[..., int(fields["ED"]) - 1])
    assert not np.array_equal(ed, cine[..., int(fields["ED"])])


def test_acdc_and_mnms_label_maps_are_unified(found) -> None:
    for record in (next(r for r in found.records if r.dataset == name) for name in ("acdc", "mnms2")):
        (unified,), _ = read_frames([record.ed_label], is_label=True)
        raw = np.asanyarray(nib.load(record.ed_label.path).dataobj)
        raw_lv, raw_rv = (3, 1) if record.dataset == "acdc" else (1, 3)
        assert np.array_equal(unified == LV_LABEL, raw == raw_lv)
        assert np.array_equal(unified == RV_LABEL, raw == raw_rv)
        assert (unified == LV_LABEL).sum() > 0


def test_mnms_indices_are_zero_based_into_4d(found) -> None:
    record = next(r for r in found.records if r.dataset == "mnms" and r.ed_label is not None)
    cine = nib.load(record.ed_image.path).get_fdata(dtype=np.float32)
    (ed, es), _ = read_frames([record.ed_image, record.es_image], is_label=False)
    assert np.array_equal(ed, cine[..., record.ed_image.frame])
    assert np.array_equal(es, cine[..., record.es_image.frame])


def test_mnms_4d_ground_truth_is_labelled_only_at_ed_es(found) -> None:
    record = next(r for r in found.records if r.dataset == "mnms" and r.ed_label is not None)
    gt = np.asanyarray(nib.load(record.ed_label.path).dataobj)
    labelled = {t for t in range(gt.shape[3]) if gt[..., t].any()}
    assert labelled == {record.ed_label.frame, record.es_label.frame}


def test_mnms_unlabeled_ground_truth_is_ignored(found) -> None:
    unlabeled = [r for r in found.records if "Unlabeled" in r.source.parts]
    assert unlabeled and all(r.ed_label is None and r.es_label is None for r in unlabeled)
    assert all(r.vendor == "ge" for r in unlabeled)


def test_mnms_csv_by_column_name_in_other_release(one_subject) -> None:
    root, folder, csv_path = one_subject("mnms")
    header, row = csv_path.read_text().splitlines()[:2]
    names, values = header.split(",")[1:], row.split(",")[1:]
    order = [names.index(n) for n in ("Pathology", "ES", "ED", "Centre", "Vendor", "VendorName", "External code")]
    csv_path.unlink()
    older = csv_path.with_name("201014_M&Ms_Dataset_Information_-_opendataset.csv")
    older.write_text(",".join(names[i] for i in order) + "\n" + ",".join(values[i] for i in order) + "\n")
    result = discover([root], LabelRule())
    assert not result.problems and [r.pid for r in result.records] == [folder.name]
    assert result.records[0].ed_image.frame == int(values[names.index("ED")])


def test_mnms_latest_dated_csv_wins(one_subject) -> None:
    root, folder, csv_path = one_subject("mnms")
    stale = csv_path.with_name("201014_M&Ms_Dataset_Information_-_opendataset.csv")
    stale.write_text(csv_path.read_text().splitlines()[0] + "\n")
    assert mnms.metadata_csvs(sorted(root.rglob("*.csv"))) == [csv_path]
    assert [r.pid for r in discover([root], LabelRule()).records] == [folder.name]


def test_mnms2_csv_padding_rows_and_integer_codes(synthetic_raw: Path, found) -> None:
    lines = (synthetic_raw / "MnM2" / "dataset_information.csv").read_text().splitlines()
    assert lines[0] == "SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD"
    assert lines[-1] == ",,,," and lines[1].split(",")[0] == "1"
    records = [r for r in found.records if r.dataset == "mnms2"]
    assert len(records) == sum(1 for line in lines[1:] if line.strip(","))
    assert all(len(r.pid) == 3 and r.pid.isdigit() for r in records)


def test_mnms2_fail_spelling_maps_to_fall(one_subject) -> None:
    root, _, csv_path = one_subject("mnms2")
    header, row = csv_path.read_text().splitlines()[:2]
    fields = row.split(",")
    fields[1] = "FAIL"
    csv_path.write_text(f"{header}\n{','.join(fields)}\n,,,,\n")
    (record,) = discover([root], LabelRule()).records
    assert record.pathology == "FALL" and record.label == 1


def test_layouts_are_found_at_any_depth(one_subject, tmp_path: Path) -> None:
    root, folder, _ = one_subject("acdc")
    deep = tmp_path / "a" / "b" / "c" / "d"
    shutil.move(str(root), str(deep))
    result = discover([tmp_path / "a"], LabelRule())
    assert [r.pid for r in result.records] == [folder.name] and not result.problems


def test_extra_files_are_ignored(one_subject) -> None:
    root, folder, _ = one_subject("acdc")
    (folder / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("readme")
    assert (folder / "MANDATORY_CITATION.md").is_file()
    result = discover([root], LabelRule())
    assert len(result.records) == 1 and not result.problems


def test_same_subject_under_two_roots_is_kept_once(one_subject, tmp_path: Path) -> None:
    root, _, _ = one_subject("mnms2")
    copy = tmp_path / "second"
    shutil.copytree(root, copy)
    result = discover([root, copy], LabelRule())
    assert len(result.records) == 1
    assert len(result.problems) == 1 and "duplicate subject" in result.problems[0].reason


def test_label_rule_override_and_unknown_codes() -> None:
    rule = LabelRule(parse_label_overrides(["AHS=0"]))
    assert rule.code_and_label("mnms", "AHS", "x.csv", "Pathology") == ("AHS", 0)
    assert LabelRule().code_and_label("mnms", "AHS", "x.csv", "Pathology") == ("AHS", 1)
    assert LabelRule().code_and_label("mnms", "Other", "x.csv", "Pathology") == ("Other", 1)
    with pytest.raises(ValueError, match="unknown pathology code"):
        LabelRule({"HEALTHY": 0})
    with pytest.raises(ValueError, match="CODE=0"):
        parse_label_overrides(["AHS"])


def test_cinema_preprocessed_folder_is_read(cinema_examples: Path) -> None:
    result = discover([cinema_examples], LabelRule())
    assert not result.problems
    assert {(r.dataset, r.vendor, r.layout) for r in result.records} == {
        ("acdc", "siemens", "cinema"),
        ("mnms", "siemens", "cinema"),
        ("mnms2", "siemens", "cinema"),
    }


def test_cinema_preprocessed_unknown_dataset_is_a_listed_problem(cinema_examples: Path) -> None:
    """A `dataset` column naming a dataset without known pathology codes is the row's problem, not a crash."""
    csv_path = cinema_examples / "train_metadata.csv"
    lines = csv_path.read_text().splitlines()
    lines[0] += ",dataset"
    lines[1:] = [line + ",ukbb" for line in lines[1:]]
    csv_path.write_text("\n".join(lines) + "\n")
    result = discover([cinema_examples], LabelRule())
    vendor_rows = [problem for problem in result.problems if "field dataset is 'ukbb'" in problem.reason]
    assert vendor_rows and all(problem.path == str(csv_path) for problem in vendor_rows)


def test_mnms2_reader_requires_its_columns(one_subject) -> None:
    root, _, csv_path = one_subject("mnms2")
    csv_path.write_text(csv_path.read_text().replace("VENDOR", "MAKER"))
    result = mnms2.find(sorted(p for p in root.rglob("*") if p.is_file()), LabelRule())
    assert not result[0] and "missing column 'VENDOR'" in result[1][0].reason


def test_folder_symlink_loops_do_not_hang_discovery(one_subject) -> None:
    root, folder, _ = one_subject("acdc")
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to("..")
    (folder / "self").symlink_to(".")
    with fail_after(30):
        result = discover([root], LabelRule())
        files = list_files(root)
    assert [r.pid for r in result.records] == [folder.name] and not result.problems
    assert not any(part in ("loop", "self") for path in files for part in path.relative_to(root).parts)


def test_file_symlink_loop_is_listed_and_ignored_when_unused(one_subject) -> None:
    root, folder, _ = one_subject("acdc")
    (folder / "a.nii.gz").symlink_to("b.nii.gz")
    (folder / "b.nii.gz").symlink_to("a.nii.gz")
    with fail_after(30):
        result = discover([root], LabelRule())
    assert {folder / "a.nii.gz", folder / "b.nii.gz"} <= set(list_files(root))
    assert [r.pid for r in result.records] == [folder.name] and not result.problems
