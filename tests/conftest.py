"""Shared fixtures. Keep this small: fixtures are named after what they make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from testkit import synthetic_ct as make_synthetic_ct

REAL_CT = Path(__file__).parent / "data" / "real_ct"
SLOW_SECONDS = 2.0  # a test that took longer in the last recorded full run is marked slow (make test-fast)


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` the tests that ``tests/durations.json`` (written by ``tests/record_durations.py`` from
    a full run on 2 cores) records at ``SLOW_SECONDS`` or more, beside those marked slow by hand."""
    import json

    path = Path(__file__).parent / "durations.json"
    if not path.exists():
        return
    durations = json.loads(path.read_text())
    for item in items:
        if durations.get(item.nodeid, 0.0) >= SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def nifti_writer():
    """write(path, array, spacing=(1.5, 1.5, 2.0), origin=(0, 0, 0), affine=None) -> path."""
    import nibabel as nib

    def write(path, array, spacing=(1.5, 1.5, 2.0), origin=(0.0, 0.0, 0.0), affine=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if affine is None:
            affine = np.diag([*spacing, 1.0])
            affine[:3, 3] = origin
        nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
        return path

    return write


@pytest.fixture
def ct_case_writer(nifti_writer):
    """write(image_path, label_path=None, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.0), seed=0) writes a
    synthetic CT (int16 HU) and optionally its label map (uint8: 0, 1 organ, 2 bone)."""

    def write(image_path, label_path=None, shape=(40, 40, 24), spacing=(1.5, 1.5, 2.0), seed=0):
        img, lab = make_synthetic_ct(shape, seed)
        nifti_writer(image_path, img, spacing)
        if label_path is not None:
            nifti_writer(label_path, lab, spacing)
        return Path(image_path), (Path(label_path) if label_path is not None else None)

    return write


@pytest.fixture
def synthetic_ct():
    """make(shape=(40, 40, 24), seed=0) -> (int16 HU image, uint8 label: 1 organ, 2 bone), the shared
    synthetic CT of tests/testkit.py."""
    return lambda shape=(40, 40, 24), seed=0: make_synthetic_ct(shape, seed)


@pytest.fixture
def dicom_series_writer():
    """write(folder, volume_hu (X, Y, Z), spacing=(sx, sy, sz), origin=(x0, y0, z0) in LPS mm,
    series_uid=None, instance_numbers=None, suffix="") writes an uncompressed axial CT series.

    Voxel (i, j, k) lies at LPS origin + (i*sx, j*sy, k*sz): slice k's pixel array is volume[:, :, k].T
    (DICOM rows run along y). ``instance_numbers`` (one per slice) lets a test scramble their order.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    def write(
        folder,
        volume,
        spacing=(0.8, 0.8, 2.5),
        origin=(-20.0, -30.0, 100.0),
        series_uid=None,
        instance_numbers=None,
        suffix="",
    ):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        volume = np.asarray(volume)
        series_uid = series_uid or generate_uid()
        study_uid = generate_uid()
        nz = volume.shape[2]
        numbers = list(instance_numbers) if instance_numbers is not None else list(range(1, nz + 1))
        paths = []
        for k in range(nz):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            sop = generate_uid()
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = folder / f"slice_{series_uid[-6:]}_{k:03d}{suffix}"
            ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.Modality = "CT"
            ds.PatientID = "synthetic"
            ds.InstanceNumber = numbers[k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2] + k * spacing[2])]
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
            ds.SliceThickness = float(spacing[2])
            pix = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.int16)  # stored = HU - intercept
            ds.Rows, ds.Columns = pix.shape
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1  # signed
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = np.ascontiguousarray(pix).tobytes()
            ds.save_as(str(path), enforce_file_format=True)
            paths.append(path)
        assert pydicom.misc.is_dicom(str(paths[0]))
        return folder

    return write


@pytest.fixture
def real_abdomen_dicom():
    """(dicom folder, label map) of the real abdominal CT fixture (TotalSegmentator, Apache-2.0)."""
    base = REAL_CT / "abdomen_dicom"
    if not (base / "labels_btcv13.nii.gz").exists():
        pytest.skip("tests/data/real_ct/abdomen_dicom is missing")
    return base / "dicom", base / "labels_btcv13.nii.gz"
