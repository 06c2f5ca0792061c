"""Test-time flips (mean softmax over the 8 flips) and largest-connected-component post-processing, each
against a reference written here (torch.flip; scipy's labelling)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medhpm.segment.predict import Predictor, keep_largest_components


@pytest.fixture(scope="module")
def predictors(tiny_checkpoint):
    return (
        Predictor.from_checkpoint(tiny_checkpoint, device="cpu"),
        Predictor.from_checkpoint(tiny_checkpoint, device="cpu", tta=True),
    )


def test_tta_is_the_mean_softmax_over_the_eight_flips(predictors):
    plain, tta = predictors
    x = torch.rand(1, 40, 32, 36) * 2 - 1
    ref = torch.zeros_like(plain._infer(x, probabilities=True))
    for n in range(4):
        for axes in itertools.combinations((1, 2, 3), n):
            dims = list(axes)
            xf = torch.flip(x, dims) if dims else x
            p = plain._infer(xf, probabilities=True)
            ref += torch.flip(p, dims) if dims else p
    ref /= 8
    got = tta._infer(x, probabilities=False)  # TTA always averages probabilities
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(0), torch.ones(got.shape[1:]), atol=1e-4, rtol=0)
    assert (got - plain._infer(x, probabilities=True)).abs().max() > 1e-4  # the flips did change the result


def _reference_largest(label):
    out = np.zeros_like(label)
    for v in np.unique(label):
        if v == 0:
            continue
        comp, n = ndimage.label(label == v, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(comp.ravel())[1:]
        out[comp == 1 + int(np.argmax(sizes))] = v
    return out


def test_largest_component_keeps_each_organs_largest_piece():
    rng = np.random.default_rng(1)
    label = np.zeros((30, 26, 12), np.uint8)
    label[2:12, 2:12, 2:8] = 6  # liver
    label[20:23, 3:6, 2:4] = 6  # a stray piece of liver
    label[14, 14, 5] = 6  # a single voxel
    label[15:25, 15:24, 3:10] = 1  # spleen
    label[12, 13, 4] = 1  # touches nothing of the spleen
    label[25, 24, 10] = 1  # diagonal neighbour of the spleen's corner: the same component with 26-connectivity
    label[rng.random(label.shape) > 0.995] = 3  # scattered voxels of another organ
    got = keep_largest_components(label)
    np.testing.assert_array_equal(got, _reference_largest(label))
    assert got[25, 24, 10] == 1 and got[12, 13, 4] == 0 and (got[20:23, 3:6, 2:4] == 0).all()
    assert keep_largest_components(np.zeros((4, 4, 4), np.uint8)).max() == 0


def test_predict_with_largest_component_writes_single_component_organs(tiny_checkpoint, seg_phantoms, tmp_path):
    # --tta through the command line costs 8 sliding windows per scan; the flips are checked in process above
    dl = json.loads(Path(seg_phantoms).read_text())
    scan = Path(seg_phantoms).parent / dl["test"][0]["image"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tiny_checkpoint),
            "-i",
            str(scan),
            "-o",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--largest-component",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    lab = np.asarray(nib.load(str(tmp_path / "out" / scan.name)).dataobj)
    assert lab.shape == nib.load(str(scan)).shape
    for v in np.unique(lab):
        if v:
            assert ndimage.label(lab == v, structure=np.ones((3, 3, 3)))[1] == 1


def test_the_command_line_shows_medhpms_warning_as_one_line(tiny_checkpoint, seg_phantoms, tmp_path):
    """--tta on a model trained without flips warns (the tiny model: data.flip_prob 0); the command line says
    it as `warning: ...`, like its errors, not as Python's `predict.py:108: UserWarning:` with a source line.
    --debug keeps Python's form."""
    dl = json.loads(Path(seg_phantoms).read_text())
    scan = Path(seg_phantoms).parent / dl["test"][0]["image"]
    cmd = [
        sys.executable,
        "-m",
        "medhpm.cli",
        "predict",
        "--model",
        str(tiny_checkpoint),
        "-i",
        str(scan),
        "--device",
        "cpu",
        "--tta",
    ]
    r = subprocess.run(cmd + ["-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    assert (tmp_path / "out" / scan.name).exists()
    flagged = [x for x in r.stderr.splitlines() if "flips" in x]
    assert flagged and flagged[0].startswith("warning: test-time flips on a model trained without flips"), r.stderr
    assert "UserWarning" not in r.stderr and "predict.py" not in r.stderr, r.stderr
    debug = cmd[:3] + ["--debug"] + cmd[3:]
    r = subprocess.run(debug + ["-o", str(tmp_path / "out2")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "UserWarning: test-time flips" in r.stderr, r.stderr


def test_the_postprocessing_benchmark_writes_its_json(tiny_checkpoint, seg_phantoms, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(Path(seg_phantoms).parent, run / "phantom")
    (run / "finetune").mkdir()
    shutil.copy(tiny_checkpoint, run / "finetune" / "best.pt")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.postprocessing",
            str(run),
            "-o",
            str(tmp_path / "pp.json"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads((tmp_path / "pp.json").read_text())
    assert set(doc["variants"]) == {"plain", "tta", "largest_component", "tta+largest_component"}
    for v in doc["variants"].values():
        assert v["scans"] == 1 and v["seconds_per_scan"] > 0 and 0 <= v["dice_mean"] <= 1
    assert doc["variants"]["plain"]["dice_change"] == 0.0
