"""`medhpm phantom --dicom`: each phantom's CT also as a DICOM series, checked with pydicom slice by slice
against the NIfTI (pixel values, positions, orientation, spacing, UIDs) and read back by medhpm's reader on
the NIfTI's grid (predicting one into a DICOM-SEG: tests/segment/test_dicom_seg.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medhpm.data.ct_reader import load_image
from medhpm.data.phantom import write_phantom_dataset
from medhpm.data.phantom.dicom import write_ct_series

SIZE = (40, 36, 10)


@pytest.fixture(scope="module")
def dicom_phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phd")
    write_phantom_dataset(out, cases=2, seed=4, size=SIZE, dicom=True)  # case 0 RAS, case 1 LPS
    return out


def _slices(folder: Path) -> list:
    return [pydicom.dcmread(str(f)) for f in sorted(folder.glob("*.dcm"))]


@pytest.mark.parametrize("case", ["phantom_000", "phantom_001"])
def test_each_slice_is_the_nifti_slice_at_its_position(dicom_phantoms, case):
    nii = nib.load(str(dicom_phantoms / "imagesTr" / f"{case}.nii.gz"))
    vol, aff = np.asarray(nii.dataobj), nii.affine
    slices = _slices(dicom_phantoms / "dicom" / case)
    assert len(slices) == vol.shape[2]
    to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    for k, ds in enumerate(slices):
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, vol[:, :, k].T.astype(np.int32))  # rows along the second axis
        # pixel (r, c) of slice k is voxel (c, r, k): position + c * col spacing * row dir + r * ...
        ipp, iop = np.asarray(ds.ImagePositionPatient, float), np.asarray(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in ((0, 0), (3, 5), (ds.Rows - 1, ds.Columns - 1)):
            world = ipp + c * dc * iop[:3] + r * dr * iop[3:]
            np.testing.assert_allclose(world, (to_lps @ [c, r, k, 1])[:3], atol=1e-3)
        assert ds.Modality == "CT" and ds.PatientID == case
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(ds.get(key)) for ds in slices}) == 1 and slices[0].get(key)
    assert len({str(ds.SOPInstanceUID) for ds in slices}) == len(slices)


def test_medhpms_reader_gives_the_nifti_array_and_affine(dicom_phantoms):
    for case in ("phantom_000", "phantom_001"):
        nii = nib.load(str(dicom_phantoms / "imagesTr" / f"{case}.nii.gz"))
        arr, aff, _ = load_image(dicom_phantoms / "dicom" / case)
        np.testing.assert_array_equal(np.asarray(arr).reshape(nii.shape), np.asarray(nii.dataobj))
        np.testing.assert_allclose(aff, nii.affine, atol=1e-3)


def test_same_seed_same_uids_and_a_rewrite_leaves_no_old_slice(dicom_phantoms, tmp_path):
    write_phantom_dataset(tmp_path, cases=1, seed=4, size=SIZE, dicom=True)
    a = _slices(dicom_phantoms / "dicom" / "phantom_000")
    b = _slices(tmp_path / "dicom" / "phantom_000")
    assert [str(d.SOPInstanceUID) for d in a] == [str(d.SOPInstanceUID) for d in b]
    # the folder rewritten with a shorter series: the 10-slice series' last files are gone
    write_phantom_dataset(tmp_path, cases=1, seed=4, size=(40, 36, 6), dicom=True)
    assert sorted(p.name for p in (tmp_path / "dicom" / "phantom_000").iterdir()) == [
        f"IM{k:04d}.dcm" for k in range(1, 7)
    ]
    assert [p.name for p in (tmp_path / "dicom").iterdir()] == ["phantom_000"]  # no temporary folder left


def test_a_mirrored_affine_is_refused():
    with pytest.raises(ValueError, match="mirrors"):
        write_ct_series(
            np.zeros((4, 4, 3), np.int16), np.diag([-1.0, 1.0, 1.0, 1.0]), "/nonexistent/x", case="x", seed=0
        )


def test_the_command_writes_the_series_beside_the_nifti(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "phantom",
            str(tmp_path / "d"),
            "--cases",
            "1",
            "--size",
            "24,24,6",
            "--spacing",
            "4,4,5",
            "--dicom",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"DICOM series in {tmp_path / 'd' / 'dicom'}" in r.stdout
    assert len(list((tmp_path / "d" / "dicom" / "phantom_000").glob("IM*.dcm"))) == 6
    assert (tmp_path / "d" / "imagesTr" / "phantom_000.nii.gz").exists()
