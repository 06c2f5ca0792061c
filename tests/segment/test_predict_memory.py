"""Predictor.predict in memory: a path, a nibabel image and an array with its affine give one result, in the
input's own geometry, and the file commands write exactly that result."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medhpm.data.datalist import DataError
from medhpm.segment.predict import Prediction, Predictor


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


def _scans(seg_phantoms):
    dl = json.loads(Path(seg_phantoms).read_text())
    return [Path(seg_phantoms).parent / e["image"] for e in dl["training"] + dl["test"]]


def test_path_nibabel_image_and_array_give_the_file_commands_result(predictor, seg_phantoms, tmp_path):
    for scan in _scans(seg_phantoms)[:2]:  # an RAS and an LPS header
        img = nib.load(str(scan))
        by_path = predictor.predict(scan, probabilities=True)
        by_image = predictor.predict(img, probabilities=True)
        by_array = predictor.predict(np.asanyarray(img.dataobj), affine=img.affine, probabilities=True)
        assert isinstance(by_path, Prediction) and by_path.classes == predictor.classes
        for res in (by_path, by_image, by_array):
            assert res.label.shape == img.shape and res.label.dtype == np.uint8
            np.testing.assert_allclose(res.affine, img.affine, atol=1e-6)
            assert res.probabilities.shape == (max(predictor.classes) + 1, *img.shape)
            np.testing.assert_allclose(res.probabilities.sum(0), 1.0, atol=1e-3)
        # the softmax is not constant: equal results are a real check, not two empty maps
        assert by_path.probabilities.std() > 1e-3
        np.testing.assert_array_equal(by_image.label, by_path.label)
        np.testing.assert_array_equal(by_array.label, by_path.label)
        np.testing.assert_allclose(by_array.probabilities, by_path.probabilities, atol=1e-5)

        written = nib.load(str(predictor.predict_file(scan, tmp_path, save_probabilities=True)))
        np.testing.assert_array_equal(np.asarray(written.dataobj), by_path.label)
        assert int(written.header["qform_code"]) == int(img.header["qform_code"]) or 1
        np.testing.assert_allclose(written.affine, img.affine, atol=1e-5)
        np.testing.assert_allclose(by_array.to_nifti().affine, img.affine, atol=1e-6)


def test_prediction_prints_no_warnings(predictor, seg_phantoms):
    """Users read the console: predicting a scan (label and probabilities) must not print library warnings
    (MONAI warned "Setting affine, but the applied meta contains an affine" for every scan)."""
    scan = _scans(seg_phantoms)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = predictor.predict(scan, probabilities=True)
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []
    np.testing.assert_allclose(res.affine, nib.load(str(scan)).affine, atol=1e-6)


def test_a_dicom_series_in_memory_is_the_series_predicted_from_its_folder(predictor, real_abdomen_dicom):
    folder, ref = real_abdomen_dicom
    res = predictor.predict(folder)
    ref = nib.load(str(ref))
    assert res.label.shape == ref.shape and res.header is None
    np.testing.assert_allclose(res.affine, ref.affine, atol=1e-3)


def test_bad_inputs_are_refused_with_a_sentence(predictor, tmp_path):
    vol = np.zeros((20, 20, 10), np.float32) - 1000
    with pytest.raises(ValueError, match="needs its affine"):
        predictor.predict(vol)
    with pytest.raises(ValueError, match="4x4"):
        predictor.predict(vol, affine=np.eye(3))
    with pytest.raises(ValueError, match="3D CT volume"):
        predictor.predict(vol[:, :, 0], affine=np.eye(4))
    with pytest.raises(ValueError, match="pass affine only with a NumPy array"):
        predictor.predict(nib.Nifti1Image(vol, np.eye(4)), affine=np.eye(4))
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        predictor.predict(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="predict takes a path"):
        predictor.predict([1, 2, 3])
    bad = vol.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(DataError, match="the array"):
        predictor.predict(bad, affine=np.diag([1.5, 1.5, 3.0, 1.0]))


def test_sliding_window_settings_out_of_range_are_refused_by_the_cli(tiny_checkpoint, seg_phantoms, tmp_path):
    """Each bad setting is named with its range, and nothing is written (--sw-batch-size 0 used to fall back
    to the checkpoint's value without a word)."""
    import subprocess
    import sys

    scan = _scans(seg_phantoms)[0]
    for option, value, said in (
        ("--sw-batch-size", "0", "sw_batch_size (windows per forward pass) must be at least 1, got 0"),
        ("--overlap", "1.5", "overlap must lie in [0, 1), got 1.5"),
        ("--blend", "median", "blend must be gaussian or constant, got 'median'"),
    ):
        out = tmp_path / option.strip("-")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "medhpm.cli",
                "predict",
                "-m",
                str(tiny_checkpoint),
                "-i",
                str(scan),
                "-o",
                str(out),
                "--device",
                "cpu",
                option,
                value,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode != 0 and f"error: {said}" in r.stderr, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and not any(out.glob("*.nii.gz"))
