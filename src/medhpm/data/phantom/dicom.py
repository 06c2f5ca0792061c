"""A phantom's CT as a DICOM series (pydicom), so that DICOM in -> DICOM-SEG out can be tried without data.

``write_ct_series(image, affine, folder, case=..., seed=...)`` writes one uncompressed axial CT Image
Storage file per slice of the third array axis, with the study, series, SOP instance and frame-of-reference
UIDs a DICOM-SEG references, and the patient and study attributes highdicom copies into it. The geometry is
the NIfTI's: a pixel (row r, column c) of slice k is voxel (c, r, k), the row direction of
ImageOrientationPatient is the first array axis and the column direction the second (both in DICOM's LPS),
ImagePositionPatient is voxel (0, 0, k). A DICOM reader that stacks the slices along their normal
(medhpm's, ITK's, MONAI's) therefore returns the NIfTI's array on the NIfTI's affine, so a prediction of
the series is compared with the phantom's label map as it is. The UIDs derive from the seed and the case
(pydicom's ``generate_uid`` with entropy sources): the same seed writes the same files.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import numpy as np

from medhpm import __version__

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS world (NIfTI) <-> LPS patient coordinates (DICOM)


def write_ct_series(
    image: np.ndarray, affine: np.ndarray, folder: str | pathlib.Path, *, case: str, seed: int
) -> pathlib.Path:
    """Write ``image`` (int16 HU, array axes as ``affine``: voxel -> RAS mm) into ``folder`` as
    ``IM0001.dcm``, ... (slice k of the third axis is file k + 1); returns the folder.

    ``affine`` must keep the slice normal along the third axis (``det > 0`` of its 3x3 part, true of every
    phantom, RAS or LPS): with a mirrored affine a reader's slice order would reverse the third axis."""
    from pydicom.uid import generate_uid

    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.int16:
        raise ValueError(f"a phantom series needs a 3D int16 volume in HU, got {image.dtype} {image.shape}")
    rot = _LPS @ np.asarray(affine, float)[:3, :3]
    if np.linalg.det(rot) <= 0:
        raise ValueError("the affine mirrors the volume (det <= 0): its slices would be read in reverse order")
    spacing = np.linalg.norm(rot, axis=0)
    row_dir, col_dir = rot[:, 0] / spacing[0], rot[:, 1] / spacing[1]
    origin = _LPS @ np.asarray(affine, float)[:3, 3]

    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=["medhpm-phantom", str(seed), case, *map(str, parts)])

    folder = pathlib.Path(folder)
    # written into a fresh folder that then replaces ``folder``: an earlier, longer series of this case
    # must not leave slices behind, and a cut-off run must not leave a partial series under the name
    folder.parent.mkdir(parents=True, exist_ok=True)
    part = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        _write_slices(image, rot, spacing, row_dir, col_dir, origin, part, uid, case, seed)
        if folder.exists():
            old = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            folder.replace(old / folder.name)
            part.replace(folder)
            shutil.rmtree(old)
        else:
            part.replace(folder)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return folder


def _write_slices(
    image, rot, spacing, row_dir, col_dir, origin, folder: pathlib.Path, uid, case: str, seed: int
) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    study, series, frame = uid("study"), uid("series"), uid("frame")
    for k in range(image.shape[2]):
        path = folder / f"IM{k + 1:04d}.dcm"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop = uid("slice", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer = "CT", "medhpm synthetic phantom"
        ds.SoftwareVersions = f"medhpm {__version__}"
        ds.PatientName, ds.PatientID = f"Phantom^{case}", case
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDate, ds.StudyTime = "", ""
        ds.StudyDescription = "medhpm synthetic abdominal CT phantom (not patient data)"
        ds.SeriesDescription = f"{case} seed {seed}"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(f"{v:.6f}") for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(f"{v:.4f}") for v in origin + k * rot[:, 2]]
        ds.PixelSpacing = [float(f"{spacing[1]:.6f}"), float(f"{spacing[0]:.6f}")]  # between rows, columns
        ds.SliceThickness = ds.SpacingBetweenSlices = float(f"{spacing[2]:.6f}")
        pix = np.ascontiguousarray(image[:, :, k].T)  # rows along the second array axis
        ds.Rows, ds.Columns = pix.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1  # signed HU
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400  # soft tissue
        ds.PixelData = pix.astype("<i2").tobytes()
        ds.save_as(str(path), enforce_file_format=True)
