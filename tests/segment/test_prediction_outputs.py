"""What `medhpm predict` writes beside each label map (colour tables for 3D Slicer and ITK-SNAP, one
colour source with the figures) and how it names outputs (nnU-Net's CASE_0000 -> CASE)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medhpm.data.color_tables import read_itksnap, read_slicer_ctbl, slicer_ctbl_text, itksnap_text
from medhpm.data.labels import label_rgb
from medhpm.data.scans import case_name
from medhpm.runtime.checkpoint import load_checkpoint
from medhpm.viz.overlay import label_color


def _nnunet_folder(seg_phantoms, folder: Path) -> list[str]:
    dl = json.loads(Path(seg_phantoms).read_text())
    folder.mkdir()
    cases = []
    for i, e in enumerate(dl["training"][:2]):
        shutil.copy(Path(seg_phantoms).parent / e["image"], folder / f"case_{i:03d}_0000.nii.gz")
        cases.append(f"case_{i:03d}")
    return cases


def test_predict_names_nnunet_inputs_and_writes_both_colour_tables(tiny_checkpoint, seg_phantoms, tmp_path):
    cases = _nnunet_folder(seg_phantoms, tmp_path / "imagesTs")
    out = tmp_path / "pred"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tiny_checkpoint),
            "-i",
            str(tmp_path / "imagesTs"),
            "-o",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{c}{ext}" for c in cases for ext in (".nii.gz", ".ctbl", ".itksnap.txt")
    )
    classes = {
        int(k): v for k, v in load_checkpoint(tiny_checkpoint, stage="finetune")["model_args"]["classes"].items()
    }
    assert len(classes) == 13  # the phantoms' BTCV labels
    for c in cases:
        lab = np.asarray(nib.load(str(out / f"{c}.nii.gz")).dataobj)
        ctbl = read_slicer_ctbl(out / f"{c}.ctbl")
        snap = read_itksnap(out / f"{c}.itksnap.txt")
        assert set(ctbl) == set(snap) == {0, *classes} and set(np.unique(lab)) <= set(ctbl)
        assert ctbl[0][1][3] == 0 and snap[0][2] == 0.0  # background transparent
        for v, name in classes.items():
            assert ctbl[v][0] == name.replace(" ", "_") and snap[v][0] == name
            # one colour source: the overlay figures paint label v in exactly this colour
            assert ctbl[v][1][:3] == snap[v][1] == label_rgb(v)
            assert np.allclose(np.asarray(label_color(v)) * 255, label_rgb(v))
            assert ctbl[v][1][3] == 255 and snap[v][2] == 1.0


def test_an_nnunet_image_and_a_case_of_that_name_cannot_share_an_output(tiny_checkpoint, seg_phantoms, tmp_path):
    cases = _nnunet_folder(seg_phantoms, tmp_path / "in")
    shutil.copy(tmp_path / "in" / f"{cases[0]}_0000.nii.gz", tmp_path / "in" / f"{cases[0]}.nii.gz")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tiny_checkpoint),
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode != 0
    assert "more than one" in r.stderr and f"{cases[0]}.nii.gz" in r.stderr and f"{cases[0]}_0000.nii.gz" in r.stderr
    assert not (tmp_path / "pred").exists()


def test_case_names_drop_the_nnunet_channel_suffix_of_nifti_files_only():
    assert case_name("/d/CASE_0000.nii.gz") == "CASE" and case_name("/d/CASE_0001.nii.gz") == "CASE_0001"
    assert case_name("/d/p1/ct_0000.nii", "/d") == "p1_ct"
    assert case_name("/d/series_0000") == "series_0000"  # a DICOM folder keeps its name
    assert case_name("/d/_0000.nii.gz") == "_0000"


def test_colour_table_texts_follow_the_viewers_formats():
    classes = {2: "right kidney", 1: "spleen"}
    ctbl = slicer_ctbl_text(classes).splitlines()
    assert ctbl[0].startswith("# Color table file") and ctbl[1] == "# 3 values"
    r, g, b = label_rgb(2)
    assert ctbl[2:] == [
        "0 Background 0 0 0 0",
        f"1 spleen {' '.join(map(str, label_rgb(1)))} 255",
        f"2 right_kidney {r} {g} {b} 255",
    ]
    rows = [ln.split(maxsplit=7) for ln in itksnap_text(classes).splitlines() if not ln.startswith("#")]
    assert rows[2] == ["2", str(r), str(g), str(b), "1", "1", "1", '"right kidney"']


def test_predict_statistics_are_the_scans_own_hu_inside_the_written_label_map(tiny_checkpoint, seg_phantoms, tmp_path):
    from medhpm.evaluate.organ_stats import organ_statistics
    from medhpm.segment.predict import Predictor

    dl = json.loads(Path(seg_phantoms).read_text())
    scans = [Path(seg_phantoms).parent / e["image"] for e in dl["training"] + dl["validation"] + dl["test"]]
    scan = next(p for p in scans if nib.aff2axcodes(nib.load(str(p)).affine)[0] == "L")  # an LPS header
    (tmp_path / "in").mkdir()
    shutil.copy(scan, tmp_path / "in" / "ct.nii.gz")
    out = tmp_path / "pred"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tiny_checkpoint),
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--statistics",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads((out / "statistics.json").read_text())
    assert set(doc["conventions"]) == {"volume_ml", "hu_mean", "hu_std"}
    assert doc["cases"]["ct"]["input"] == str(tmp_path / "in" / "ct.nii.gz")
    img = nib.load(str(scan))
    label = np.asarray(nib.load(str(out / "ct.nii.gz")).dataobj)
    hu = img.get_fdata()
    classes = {
        int(k): v for k, v in load_checkpoint(tiny_checkpoint, stage="finetune")["model_args"]["classes"].items()
    }
    expected = organ_statistics(hu, label, img.affine, classes)
    got = doc["cases"]["ct"]["organs"]
    assert set(got) == {str(v) for v in classes}
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    for v, e in expected.items():
        assert got[v]["voxels"] == int((label == int(v)).sum()) == e["voxels"]
        assert got[v]["volume_ml"] == pytest.approx(e["voxels"] * voxel_ml, rel=1e-5)
        if e["voxels"]:
            assert got[v]["hu_mean"] == pytest.approx(float(hu[label == int(v)].mean()), abs=1e-3)
            assert got[v]["hu_std"] == pytest.approx(float(hu[label == int(v)].std()), abs=1e-3)
    assert sum(e["voxels"] for e in expected.values()) > 0
    rows = (out / "statistics.csv").read_text().splitlines()
    assert rows[0] == "case,label,name,voxels,volume_ml,hu_mean,hu_std" and len(rows) == 1 + len(classes)
    # in memory, from the array: the same numbers
    mem = Predictor.from_checkpoint(tiny_checkpoint, device="cpu").predict(
        np.asanyarray(img.dataobj), affine=img.affine, statistics=True
    )
    for v in got:
        assert mem.statistics[v]["voxels"] == got[v]["voxels"]
        assert mem.statistics[v]["volume_ml"] == pytest.approx(got[v]["volume_ml"], rel=1e-9)
        if got[v]["voxels"]:
            assert mem.statistics[v]["hu_mean"] == pytest.approx(got[v]["hu_mean"], abs=1e-4)
