"""`medhpm evaluate` names the user's classes: from the datalist / dataset.json labels, the checkpoint's
colour table beside the predictions, or by value; never BTCV names for other data; a --classes that names
values found nowhere is refused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medhpm.data.color_tables import write_color_tables
from medhpm.evaluate import evaluate_predictions
from medhpm.evaluate.classes import classes_from_labels

AFFINE = np.diag([0.9, 1.1, 2.5, 1.0])


def _maps(shift: int = 0, second: bool = True) -> np.ndarray:
    lab = np.zeros((24, 20, 10), np.uint8)
    lab[3 + shift : 11 + shift, 3:11, 2:7] = 1
    if second:
        lab[15:20, 12:18, 3:8] = 2
    return lab


def _save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))


@pytest.fixture
def two_label_set(tmp_path):
    """A data set of two classes of its own (values 1 and 2), as an MSD datalist, and predictions."""
    root = tmp_path / "ds"
    for c in ("a", "b"):
        _save(_maps(), root / "labelsTr" / f"{c}.nii.gz")
        _save(_maps(shift=1, second=c == "a"), tmp_path / "pred" / f"{c}.nii.gz")
    dl = {
        "labels": {"0": "background", "1": "tumour", "2": "renal cyst"},
        "test": [{"image": f"imagesTr/{c}.nii.gz", "label": f"labelsTr/{c}.nii.gz"} for c in ("a", "b")],
    }
    (root / "dataset.json").write_text(json.dumps(dl))
    return tmp_path / "pred", root


def _evaluate(*args):
    return subprocess.run(
        [sys.executable, "-m", "medhpm.cli", "evaluate", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_evaluate_names_a_two_label_data_set_from_its_datalist(two_label_set, tmp_path):
    pred, root = two_label_set
    r = _evaluate("--pred", pred, "--label", root / "dataset.json", "-o", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["classes"] == {"1": "tumour", "2": "renal_cyst"}
    assert str(root / "dataset.json") in m["classes_source"]
    assert m["cases"]["b"]["2"]["status"] == "missed"
    table = (tmp_path / "ev" / "table.md").read_text()
    assert "Tumour" in table and "Renal Cyst" in table and "Spleen" not in table and "Kidney" not in table
    rows = list(csv.DictReader((tmp_path / "ev" / "metrics.csv").open()))
    assert {r["name"] for r in rows} == {"tumour", "renal_cyst"}


def test_an_nnunet_dataset_json_above_the_label_folder_names_the_classes(two_label_set, tmp_path):
    pred, root = two_label_set
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1, "organ": 2}}))
    m = evaluate_predictions(pred, root / "labelsTr", None, tmp_path / "ev")
    assert m["classes"] == {"1": "lesion", "2": "organ"}


def test_the_checkpoints_classes_come_from_the_colour_tables_beside_the_predictions(two_label_set, tmp_path):
    pred, root = two_label_set
    (root / "dataset.json").unlink()
    for c in ("a", "b"):
        write_color_tables(pred / f"{c}.nii.gz", {1: "tumour", 2: "renal cyst"})
    m = evaluate_predictions(pred, root / "labelsTr", None, tmp_path / "ev")
    assert m["classes"] == {"1": "tumour", "2": "renal_cyst"} and "a.ctbl" in m["classes_source"]


def test_without_names_classes_are_named_by_value_never_btcv(tmp_path):
    _save(_maps(second=False), tmp_path / "gt" / "a.nii.gz")
    _save(_maps(), tmp_path / "gt" / "b.nii.gz")
    _save(_maps(shift=1, second=False), tmp_path / "pred" / "a.nii.gz")
    _save(_maps(shift=1), tmp_path / "pred" / "b.nii.gz")
    r = _evaluate("--pred", tmp_path / "pred", "--label", tmp_path / "gt", "-o", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["classes"] == {"1": "class_1", "2": "class_2"} and "label values" in m["classes_source"]
    assert list(m["cases"]["a"]) == ["1", "2"] and m["cases"]["a"]["2"]["status"] == "absent"
    assert m["summary"]["2"]["n"] == 1 and m["summary"]["2"]["n_absent"] == 1
    assert "Spleen" not in (tmp_path / "ev" / "table.md").read_text()


def test_classes_naming_values_found_nowhere_are_refused(two_label_set, tmp_path):
    pred, root = two_label_set
    r = _evaluate("--pred", pred, "--label", root / "dataset.json", "--classes", "btcv8", "-o", tmp_path / "ev")
    assert r.returncode != 0
    assert "3 (left_kidney)" in r.stderr and "appear in no prediction" in r.stderr and "[1, 2]" in r.stderr
    assert not (tmp_path / "ev").exists()
    ok = _evaluate("--pred", pred, "--label", root / "dataset.json", "--classes", "tumour=1", "-o", tmp_path / "e2")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["classes"] == {"1": "tumour"}


def test_classes_from_labels_keeps_btcv_names_only_at_btcv_values():
    assert classes_from_labels({0: "background", 2: "right kidney", 10: "portal and splenic vein"}) == {
        2: "right_kidney",
        10: "portal_splenic_vein",
    }
    assert classes_from_labels({1: "right kidney"}) == {1: "right_kidney"}  # a name, not the BTCV table
    assert classes_from_labels({1: "liver", 2: "3D mass", 3: "liver", 4: "Lesion (solid)"}) == {
        1: "liver",
        2: "class_2",
        3: "class_3",
        4: "Lesion_solid",
    }
