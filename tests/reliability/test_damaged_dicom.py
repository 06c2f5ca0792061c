"""A damaged file inside a DICOM series (issue 15): a file that claims to be a CT image of the series but
holds no readable pixels is an error naming it (it used to be skipped as a "non-image object": an edge slice
vanished silently, a middle one read as "uneven slice spacing"). On a copy of the real series in tests/data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rel_helpers import ct_volume, medhpm

REAL_SERIES = Path(__file__).parents[1] / "data" / "real_ct" / "abdomen_dicom" / "dicom"


def _model(finetune_run) -> Path:
    return finetune_run[0] / "final.pt"


# ================================================================================ damaged DICOM file
def _damaged_real_series(tmp_path: Path, which: str) -> tuple[Path, Path]:
    """A copy of the real 20-slice series with one file's pixel data cut off: the slice at one end of the
    series (``edge``) or in its middle; returns (folder, damaged file)."""
    import pydicom

    if not REAL_SERIES.is_dir():
        pytest.skip("tests/data/real_ct/abdomen_dicom is missing")
    folder = Path(shutil.copytree(REAL_SERIES, tmp_path / "series"))
    files = sorted(
        folder.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    )
    assert len(files) == 20
    bad = files[0] if which == "edge" else files[10]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header intact, the pixel data cut in half
    return folder, bad


@pytest.mark.parametrize("which", ["edge", "middle"])
def test_data_check_names_a_damaged_file_of_a_dicom_series(tmp_path, which):
    folder, bad = _damaged_real_series(tmp_path, which)
    res = medhpm("data", "check", folder, "--spacing", "4,4,4", "--roi", "32,32,16")
    both = res.stdout + res.stderr
    assert res.returncode == 1, both
    assert "Traceback" not in both
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("ERROR")), "")
    assert str(folder) in line and bad.name in line, res.stdout
    assert "hold no readable pixel data" in line and "SOP class CT Image Storage" in line, line
    assert "uneven slice spacing" not in line


@pytest.mark.parametrize("which", ["edge", "middle"])
def test_predict_names_a_damaged_file_of_a_dicom_series(finetune_run, tmp_path, which):
    folder, bad = _damaged_real_series(tmp_path, which)
    out = tmp_path / "pred"
    res = medhpm("predict", "--model", _model(finetune_run), "-i", folder, "-o", out)
    both = res.stdout + res.stderr
    assert res.returncode == 1, both
    assert "Traceback" not in both
    failed = [ln for ln in res.stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and bad.name in failed[0] and "no readable pixel data" in failed[0], res.stdout
    assert "0 of 1 scans segmented" in res.stdout
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_a_non_image_object_in_a_series_folder_is_still_skipped(tmp_path, dicom_series_writer):
    """A structured report beside the slices (its own SOP class, no pixels) is not a damaged slice."""
    import pydicom
    from pydicom.uid import generate_uid

    from medhpm.data.ct_reader import load_image

    folder = dicom_series_writer(tmp_path / "s", ct_volume((32, 32, 8))[0])
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.save_as(str(folder / "report.dcm"), enforce_file_format=True)
    arr, _, _ = load_image(folder)
    assert arr.shape == (32, 32, 8)
