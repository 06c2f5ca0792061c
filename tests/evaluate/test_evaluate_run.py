"""evaluate_predictions on NIfTI folders and datalists written here: matching, geometry checks, output files."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medhpm.evaluate import evaluate_predictions

SPACING = (0.8, 1.2, 3.0)
# LPS-style storage (negative x/y), as DICOM converters write; spacing sits on the diagonal
AFFINE = np.array([[-0.8, 0, 0, 120.0], [0, -1.2, 0, 80.0], [0, 0, 3.0, -300.0], [0, 0, 0, 1]])
SHAPE = (32, 28, 12)
CLASSES = {1: "spleen", 6: "liver", 11: "pancreas"}


def _hd95(p, g, spacing):  # independent reference: boundary voxels + EDT, 95th pct, max of both directions
    sp, sg = p & ~ndimage.binary_erosion(p), g & ~ndimage.binary_erosion(g)
    a = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    b = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return max(np.percentile(a, 95), np.percentile(b, 95))


def _label(shift: int = 0) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[4 + shift : 14 + shift, 4:14, 2:7] = 6  # liver: a box moved along x by `shift`
    lab[20:26, 6:12, 3:8] = 1  # spleen
    return lab  # pancreas (11) is absent everywhere


def _save(arr, path, affine=AFFINE, dtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr if dtype is None else arr.astype(dtype), affine), str(path))
    return path


@pytest.fixture
def btcv_folders(tmp_path):
    """BTCV names: labels label000N, predictions img000N (float storage for one, as some writers do)."""
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    _save(_label(), labels / "label0001.nii.gz")
    _save(_label(), labels / "label0002.nii.gz")
    _save(_label(shift=2), preds / "img0001.nii.gz")
    p2 = _label(shift=1)
    p2[p2 == 1] = 0  # spleen missed in case 2
    p2[0:3, 0:3, 0:2] = 11  # pancreas: a false positive
    _save(p2, preds / "img0002.nii.gz", dtype=np.float32)
    return preds, labels


def test_folders_metrics_files(btcv_folders, tmp_path):
    preds, labels = btcv_folders
    out = tmp_path / "out"
    m = evaluate_predictions(preds, labels, "spleen=1,liver=6,pancreas=11", out)

    text = (out / "metrics.json").read_text()
    on_disk = json.loads(text, parse_constant=lambda c: pytest.fail(f"JSON contains {c}"))
    assert on_disk == m
    assert set(m) == {
        "classes",
        "classes_source",
        "surface_tolerance_mm",
        "cases",
        "not_evaluated",
        "summary",
        "conventions",
    }
    assert m["classes"] == {"1": "spleen", "6": "liver", "11": "pancreas"}
    assert set(m["cases"]) == {"0001", "0002"}
    assert set(m["summary"]) == {"1", "6", "11", "mean"}
    for key in ("dice_mean", "hd95_mean", "dice_std", "hd95_std", "n"):
        assert key in m["summary"]["6"]
    assert {"hd95", "absent", "missed", "false_positive"} <= set(m["conventions"])

    c1, c2 = m["cases"]["0001"], m["cases"]["0002"]
    # liver box 10 voxels long moved by 2 (case 1) and 1 (case 2) along x: Dice = 8/10 and 9/10
    assert c1["6"]["dice"] == pytest.approx(0.8, abs=1e-6)
    assert c2["6"]["dice"] == pytest.approx(0.9, abs=1e-6)
    g = _label() == 6
    assert c1["6"]["hd95"] == pytest.approx(_hd95(_label(2) == 6, g, SPACING), abs=1e-3)
    assert c1["6"]["hd95"] > 0
    assert c1["1"] == {
        "dice": pytest.approx(1.0),
        "hd95": pytest.approx(0.0),
        "status": "ok",
        "surface_dice": pytest.approx(1.0),
        "assd": pytest.approx(0.0),
    }
    assert c2["1"] == {"dice": 0.0, "hd95": None, "status": "missed", "surface_dice": 0.0, "assd": None}
    assert c1["11"] == {"dice": None, "hd95": None, "status": "absent", "surface_dice": None, "assd": None}
    assert c2["11"] == {"dice": 0.0, "hd95": None, "status": "false_positive", "surface_dice": 0.0, "assd": None}
    s = m["summary"]
    assert s["1"]["dice_mean"] == pytest.approx(0.5) and s["1"]["n_missed"] == 1
    assert s["1"]["hd95_mean"] == pytest.approx(0.0)
    assert s["11"]["n_absent"] == 1 and s["11"]["n_false_positive"] == 1

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 * 3
    assert {(r["case"], r["label"], r["name"]) for r in rows} == {
        (c, str(v), n) for c in ("0001", "0002") for v, n in CLASSES.items()
    }
    for r in rows:
        e = m["cases"][r["case"]][r["label"]]
        for k in ("dice", "hd95", "surface_dice", "assd"):
            assert (r[k] == "") if e[k] is None else float(r[k]) == pytest.approx(e[k], abs=1e-6)

    # the table's Avg = mean over organs of per-organ means over cases, recomputed here from the CSV
    per_organ_dice, per_organ_hd = [], []
    for v in CLASSES:
        d = [float(r["dice"]) for r in rows if r["label"] == str(v) and r["dice"]]
        h = [float(r["hd95"]) for r in rows if r["label"] == str(v) and r["hd95"]]
        per_organ_dice.append(np.mean(d))
        if h:
            per_organ_hd.append(np.mean(h))
    table = (out / "table.md").read_text().splitlines()
    # the paper's columns, then the surface metrics' extra column set
    assert table[0] == (
        "| Method | Avg DSC / HD95 | Spleen | Liver | Pancreas | Avg NSD@1 mm / ASSD | Spleen NSD "
        "| Liver NSD | Pancreas NSD |"
    )
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[0] == "preds"
    assert cells[1] == f"{np.mean(per_organ_dice) * 100:.2f} / {np.mean(per_organ_hd):.2f}"
    assert cells[2:5] == [f"{x * 100:.2f}" for x in per_organ_dice]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_datalist_labels_match_predictions_named_after_images(tmp_path):
    # nnU-Net-like names: image case_a_0000, label case_a, prediction named after the image without channel
    root = tmp_path / "ds"
    _save(_label(), root / "labelsTs" / "case_a.nii.gz")
    _save(_label(), root / "labelsTs" / "case_b.nii.gz")
    dl = {
        "test": [
            {"image": "imagesTs/case_a_0000.nii.gz", "label": "labelsTs/case_a.nii.gz"},
            {"image": "imagesTs/case_b_0000.nii.gz", "label": "labelsTs/case_b.nii.gz"},
        ],
        "training": [],
    }
    (root / "dataset.json").write_text(json.dumps(dl))
    _save(_label(), tmp_path / "pred" / "case_a.nii.gz")
    _save(_label(shift=2), tmp_path / "pred" / "case_b_0000.nii.gz")
    m = evaluate_predictions(tmp_path / "pred", root / "dataset.json", {1: "spleen", 6: "liver"}, tmp_path / "o")
    assert set(m["cases"]) == {"case_a", "case_b"}
    assert m["cases"]["case_a"]["6"]["dice"] == pytest.approx(1.0)
    assert m["cases"]["case_b"]["6"]["dice"] == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(ValueError, match="'validation'"):
        evaluate_predictions(
            tmp_path / "pred", root / "dataset.json", "btcv8", tmp_path / "o", datalist_key="validation"
        )


def test_split_chooses_the_list_of_a_datalist_on_the_command_line(tmp_path):
    """Predictions of the validation cases against the datalist: the test list is read by default, and the
    error names the list read and --split; `--split validation` evaluates them."""
    import subprocess
    import sys

    root = tmp_path / "ds"
    for c in ("v1", "t1"):
        _save(_label(), root / "labelsTr" / f"{c}.nii.gz")
    dl = {
        "training": [],
        "labels": {"0": "background", "6": "liver"},
        "validation": [{"image": "imagesTr/v1.nii.gz", "label": "labelsTr/v1.nii.gz"}],
        "test": [{"image": "imagesTr/t1.nii.gz", "label": "labelsTr/t1.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(dl))
    _save(_label(shift=2), tmp_path / "pred" / "v1.nii.gz")
    cmd = [
        sys.executable,
        "-m",
        "medhpm.cli",
        "evaluate",
        "--pred",
        str(tmp_path / "pred"),
        "--label",
        str(root / "dataset.json"),
    ]
    r = subprocess.run(cmd + ["-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"in the 'test' list of {root / 'dataset.json'}: v1.nii.gz" in r.stderr, r.stderr
    assert "--split test|validation|training" in r.stderr and not (tmp_path / "o").exists()
    r = subprocess.run(
        cmd + ["--split", "validation", "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(m["cases"]) == ["v1"] and m["cases"]["v1"]["6"]["dice"] == pytest.approx(0.8)
    r = subprocess.run(
        cmd + ["--split", "valid", "-o", str(tmp_path / "o2")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "has no 'valid' list (its lists: test, training, validation)" in r.stderr, r.stderr


def test_two_files_pair_whatever_their_names(tmp_path):
    lab = _save(_label(), tmp_path / "gt.nii.gz")
    pred = _save(_label(shift=1), tmp_path / "my_prediction.nii")
    m = evaluate_predictions(pred, lab, "spleen=1,liver=6", tmp_path / "o", method="UNETR")
    assert list(m["cases"]) == ["gt"]
    assert m["cases"]["gt"]["6"]["dice"] == pytest.approx(0.9, abs=1e-6)
    assert (tmp_path / "o" / "table.md").read_text().splitlines()[2].startswith("| UNETR | ")


def test_geometry_mismatch_names_both_files(tmp_path):
    lab = _save(_label(), tmp_path / "labels" / "label0001.nii.gz")
    moved = AFFINE.copy()
    moved[0, 3] += 0.5  # half a millimetre off
    pred = _save(_label(), tmp_path / "preds" / "img0001.nii.gz", affine=moved)
    with pytest.raises(ValueError) as e:
        evaluate_predictions(tmp_path / "preds", tmp_path / "labels", "btcv8", tmp_path / "o")
    msg = str(e.value)
    assert str(pred) in msg and str(lab) in msg and "affine" in msg and "0.5" in msg

    _save(np.zeros((32, 28, 11), np.uint8), pred)
    with pytest.raises(ValueError) as e:
        evaluate_predictions(tmp_path / "preds", tmp_path / "labels", "btcv8", tmp_path / "o")
    assert str(pred) in str(e.value) and "(32, 28, 11)" in str(e.value) and "(32, 28, 12)" in str(e.value)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_unmatched_cases_are_listed(tmp_path):
    for n in ("0001", "0002", "0003"):
        _save(_label(), tmp_path / "labels" / f"label{n}.nii.gz")
    for n in ("0001", "0002", "0009"):
        _save(_label(), tmp_path / "preds" / f"img{n}.nii.gz")
    with pytest.raises(ValueError) as e:
        evaluate_predictions(tmp_path / "preds", tmp_path / "labels", "btcv8", tmp_path / "o")
    msg = str(e.value)
    assert "label0003.nii.gz" in msg and "img0009.nii.gz" in msg
    assert "label0001" not in msg and "img0002" not in msg


def test_only_predicted_evaluates_the_predicted_subset(tmp_path):
    """A test subset predicted, the labels folder holding every case: refused by default with the way out
    named; --only-predicted evaluates the predicted cases and records the others. A prediction without
    ground truth stays an error."""
    import subprocess
    import sys

    for n in ("0001", "0002", "0003"):
        _save(_label(), tmp_path / "labels" / f"label{n}.nii.gz")
    _save(_label(shift=2), tmp_path / "preds" / "img0001.nii.gz")
    _save(_label(), tmp_path / "preds" / "img0002.nii.gz")
    with pytest.raises(ValueError, match="label0003.nii.gz.*add --only-predicted"):
        evaluate_predictions(tmp_path / "preds", tmp_path / "labels", CLASSES, tmp_path / "o")
    assert not (tmp_path / "o").exists()

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "evaluate",
            "--pred",
            str(tmp_path / "preds"),
            "--label",
            str(tmp_path / "labels"),
            "--classes",
            "spleen=1,liver=6",
            "--only-predicted",
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 ground-truth case(s) without a prediction not evaluated: 0003" in r.stdout
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert sorted(m["cases"]) == ["0001", "0002"] and m["not_evaluated"] == ["0003"]
    # liver boxes of 10 voxels along x, one moved by 2: overlap 8 of 10 -> Dice 0.8; case 0002 is exact
    assert m["cases"]["0001"]["6"]["dice"] == pytest.approx(0.8)
    assert m["cases"]["0002"]["6"]["dice"] == pytest.approx(1.0)
    assert m["summary"]["6"]["dice_mean"] == pytest.approx(0.9)
    assert (
        "2 case(s) (1 ground-truth case(s) without a prediction not evaluated"
        in (tmp_path / "o" / "table.md").read_text()
    )

    _save(_label(), tmp_path / "preds" / "img0009.nii.gz")
    with pytest.raises(ValueError, match="img0009.nii.gz"):
        evaluate_predictions(tmp_path / "preds", tmp_path / "labels", CLASSES, tmp_path / "o2", only_predicted=True)


def test_probability_map_rejected_with_file_name(tmp_path):
    _save(_label(), tmp_path / "labels" / "c1.nii.gz")
    bad = _save(_label() * 0.3, tmp_path / "preds" / "c1.nii.gz", dtype=np.float32)
    with pytest.raises(ValueError) as e:
        evaluate_predictions(tmp_path / "preds", tmp_path / "labels", "btcv8", tmp_path / "o")
    assert str(bad) in str(e.value)


def test_all_absent_class_writes_null_not_nan(tmp_path):
    _save(_label(), tmp_path / "l" / "x.nii.gz")
    _save(_label(), tmp_path / "p" / "x.nii.gz")
    # the data set names pancreas, which no case holds: reported as absent (an explicit --classes naming a
    # value found nowhere is refused instead, see tests/evaluate/test_evaluate_classes.py)
    (tmp_path / "l" / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "6": "liver", "11": "pancreas"}})
    )
    m = evaluate_predictions(tmp_path / "p", tmp_path / "l", None, tmp_path / "o")
    assert m["classes"] == {"6": "liver", "11": "pancreas"}
    assert m["summary"]["11"]["dice_mean"] is None
    assert m["summary"]["mean"]["dice_mean"] == pytest.approx(1.0)
    literals = []  # json calls parse_constant for the non-standard NaN / Infinity / -Infinity literals only
    json.loads((tmp_path / "o" / "metrics.json").read_text(), parse_constant=literals.append)
    assert literals == []
    assert not any(isinstance(v, float) and math.isnan(v) for v in m["summary"]["11"].values())


def test_datalist_case_names_duplicate_images_and_probability_maps(tmp_path):
    # names as medhpm's predictor writes them: entry "case" if given; images sharing a file name are
    # named by their relative path; *_probs maps next to the predictions are not cases
    root = tmp_path / "ds"
    for sub in ("a", "b"):
        _save(_label(), root / sub / "seg.nii.gz")
    _save(_label(), root / "lab7.nii.gz")
    dl = {
        "test": [
            {"image": "a/ct.nii.gz", "label": "a/seg.nii.gz"},
            {"image": "b/ct.nii.gz", "label": "b/seg.nii.gz"},
            {"image": "scan.nii.gz", "label": "lab7.nii.gz", "case": "patient7"},
        ]
    }
    (root / "dl.json").write_text(json.dumps(dl))
    preds = tmp_path / "preds"
    _save(_label(), preds / "a_ct.nii.gz")
    _save(_label(shift=2), preds / "b_ct.nii.gz")
    _save(_label(), preds / "patient7.nii.gz")
    _save(np.zeros(SHAPE + (3,), np.float32), preds / "patient7_probs.nii.gz")
    m = evaluate_predictions(preds, root / "dl.json", "liver=6", tmp_path / "o")
    assert set(m["cases"]) == {"a_ct", "b_ct", "patient7"}
    assert m["cases"]["b_ct"]["6"]["dice"] == pytest.approx(0.8, abs=1e-6)
    assert m["cases"]["a_ct"]["6"]["dice"] == pytest.approx(1.0)
