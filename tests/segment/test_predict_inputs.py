"""Prediction finds and names scans by the same rule as `medhpm data check` (medhpm.data.scans)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medhpm.data.check import check_dataset
from medhpm.data.datalist import DataError
from medhpm.data.scans import case_name, find_scans, is_dicom_series
from medhpm.segment.predict import _list_inputs


def _folder_with_every_kind_of_scan(root: Path, ct_case_writer, dicom_series_writer, synthetic_ct) -> Path:
    ct_case_writer(root / "a.nii.gz", shape=(20, 20, 12))
    ct_case_writer(root / "sub" / "b.nii", shape=(20, 20, 12), seed=1)  # one level down
    series = root / "patient1" / "series"
    # 21 notes sort before the slices: a reader that looks at the first 20 entries misses the series
    for i in range(21):
        (series / f"NOTES_{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (series / f"NOTES_{i:02d}.txt").write_text("not an image")
    vol, _ = synthetic_ct((20, 20, 4), seed=2)
    dicom_series_writer(series, vol)
    (root / "readme.txt").write_text("not an image")
    return series


def test_a_folder_data_check_accepts_is_one_predict_finds_with_the_same_case_names(
    tmp_path, ct_case_writer, dicom_series_writer, synthetic_ct
):
    series = _folder_with_every_kind_of_scan(tmp_path, ct_case_writer, dicom_series_writer, synthetic_ct)
    assert len(list(series.iterdir())) > 20 and is_dicom_series(series)

    report = check_dataset(tmp_path, roi=(8, 8, 4))
    assert report.ok, report.format()
    checked = [(c["image"], c["case"]) for c in report.cases]
    predicted = [(str(p), name) for p, name in _list_inputs(tmp_path, split="test")]
    assert predicted == checked
    assert dict((name, p) for p, name in predicted) == {
        "a": str(tmp_path / "a.nii.gz"),
        "sub_b": str(tmp_path / "sub" / "b.nii"),
        "patient1_series": str(series),
    }
    assert find_scans(tmp_path) == checked

    # the series folder on its own, and a single file, keep their own names
    assert [(str(p), n) for p, n in _list_inputs(series, split="test")] == [(str(series), "series")]
    assert _list_inputs(tmp_path / "sub" / "b.nii", split="test") == [(tmp_path / "sub" / "b.nii", "b")]


def test_a_datalist_gives_predict_the_case_names_the_data_check_reports(tmp_path, ct_case_writer):
    for i, d in enumerate(("p1", "p2")):  # two images with one file name: named by their path below the datalist
        ct_case_writer(tmp_path / d / "ct.nii.gz", shape=(20, 20, 12), seed=i)  # two scans (data check compares voxels)
    js = tmp_path / "dataset.json"
    js.write_text(
        json.dumps(
            {"training": [{"image": "p1/ct.nii.gz"}], "test": [{"image": "p2/ct.nii.gz"}, {"image": "p1/ct.nii.gz"}]}
        )
    )
    # p1 is listed twice (training and test): the data check must refuse that, and so must predict
    assert not check_dataset(js).ok
    with pytest.raises(DataError, match="more than once"):
        _list_inputs(js, split="test")
    js.write_text(json.dumps({"training": [{"image": "p1/ct.nii.gz"}], "test": [{"image": "p2/ct.nii.gz"}]}))
    report = check_dataset(js, roi=(8, 8, 4))
    assert report.ok, report.format()
    test_cases = [(c["image"], c["case"]) for c in report.cases if c["split"] == "test"]
    assert (
        [(str(p), n) for p, n in _list_inputs(js, split="test")]
        == test_cases
        == [(str(tmp_path / "p2" / "ct.nii.gz"), "p2_ct")]
    )


def test_case_name_rule():
    assert case_name("/d/scan.nii.gz") == "scan" and case_name("/d/SCAN.NII") == "SCAN"
    assert case_name("/d/series") == "series"
    assert case_name("/d/p1/ct.nii.gz", "/d") == "p1_ct" and case_name("p1/ct.nii.gz", "/d") == "p1_ct"
    assert case_name("/d", "/d") == "d"
    assert case_name("/elsewhere/ct.nii.gz", "/d") == "elsewhere_ct"
    assert case_name("/data/ab/ct.nii.gz", "/data/a") == "data_ab_ct"  # a sibling folder is not inside
