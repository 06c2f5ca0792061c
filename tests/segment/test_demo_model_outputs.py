"""Issue 16's acceptance on the default demo's model (opt-in: it needs a finished `medhpm demo` folder).

    MEDHPM_DEMO_RUN=runs/demo python -m pytest -q tests/segment/test_demo_model_outputs.py

On the demo's model and test phantoms: `medhpm predict --statistics` writes both colour tables and the
statistics files; a test phantom written as a DICOM series and predicted with `--output-type both` gives a
SEG that reads back equal to the NIfTI prediction; `Predictor.predict` on an in-memory array equals the file
path's result; `medhpm evaluate` writes the surface metrics in metrics.json, the CSV and the table.
CI runs the same checks with a tiny model (test_dicom_seg.py, test_prediction_outputs.py, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medhpm.data.phantom import case_seed, generate_case
from medhpm.segment.predict import Predictor

RUN = os.environ.get("MEDHPM_DEMO_RUN")
pytestmark = pytest.mark.skipif(not RUN, reason="set MEDHPM_DEMO_RUN to a finished demo folder")


def _cli(*args, timeout=1800):
    r = subprocess.run(
        [sys.executable, "-m", "medhpm.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    return r


@pytest.fixture(scope="module")
def demo():
    run = Path(RUN)
    meta = json.loads((run / "phantom" / "dataset.json").read_text())
    return run / "finetune" / "best.pt", run / "phantom", meta


def test_predict_writes_colour_tables_and_statistics_for_every_test_phantom(demo, tmp_path):
    ckpt, data, meta = demo
    inputs = tmp_path / "in"
    inputs.mkdir()
    for e in meta["test"]:
        shutil.copy(data / e["image"], inputs / Path(e["image"]).name)
    _cli("predict", "--model", ckpt, "-i", inputs, "-o", tmp_path / "out", "--statistics", "--device", "cpu")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert "statistics.csv" in names
    for e in meta["test"]:
        stem = Path(e["image"]).name.removesuffix(".nii.gz")
        assert {f"{stem}.nii.gz", f"{stem}.ctbl", f"{stem}.itksnap.txt"} <= names
        pred = np.asarray(nib.load(str(tmp_path / "out" / f"{stem}.nii.gz")).dataobj)
        assert len(set(np.unique(pred).tolist()) - {0}) >= 6, "the demo model finds most organs"
    text = json.dumps(stats)
    assert "volume_ml" in text or "volume" in text


def test_a_test_phantom_as_a_dicom_series_gives_a_seg_equal_to_the_nifti_prediction(demo, tmp_path):
    from test_dicom_seg import SPACING, assert_seg_equals_prediction, write_series

    ckpt, _, meta = demo
    index = int(Path(meta["test"][0]["image"]).name[len("phantom_") : len("phantom_") + 3])
    # the demo's first test phantom (same seed: same anatomy) on the series' grid
    case = generate_case(case_seed(0, index), spacing=SPACING, orientation="RAS")
    folder = tmp_path / "series"
    uids = write_series(folder, case.image)
    out = tmp_path / "pred"
    _cli("predict", "--model", ckpt, "-i", folder, "-o", out, "--output-type", "both", "--device", "cpu")
    pred = np.asarray(nib.load(str(out / "series.nii.gz")).dataobj)
    assert len(set(np.unique(pred).tolist()) - {0}) >= 4
    assert_seg_equals_prediction(out / "series_seg.dcm", uids, folder, case.image, pred)


def test_in_memory_prediction_equals_the_file_path_and_evaluate_writes_surface_metrics(demo, tmp_path):
    ckpt, data, meta = demo
    e = meta["test"][1]
    p = Predictor.from_checkpoint(ckpt, device="cpu")
    img = nib.load(str(data / e["image"]))
    from_path = p.predict(data / e["image"])
    in_memory = p.predict(np.asarray(img.dataobj), affine=img.affine)
    np.testing.assert_array_equal(from_path.label, in_memory.label)
    np.testing.assert_allclose(from_path.affine, img.affine, atol=1e-6)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    nib.save(nib.Nifti1Image(from_path.label.astype(np.uint8), img.affine), str(pred_dir / Path(e["image"]).name))
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    shutil.copy(data / e["label"], lab_dir / Path(e["label"]).name)
    _cli("evaluate", "--pred", pred_dir, "--label", lab_dir, "--classes", "btcv8", "-o", tmp_path / "ev")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    text = json.dumps(m).lower()
    assert "nsd" in text or "surface" in text
    assert "assd" in text
    assert "assd" in (tmp_path / "ev" / "metrics.csv").read_text().lower()
