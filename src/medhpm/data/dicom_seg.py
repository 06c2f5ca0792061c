"""DICOM-SEG of a predicted label map, referencing the DICOM series it was predicted from (highdicom).

``write_dicom_seg(label, affine, series_folder, classes, path)`` writes one Segmentation object (binary,
one segment per organ present in the label map) that shares the series' study, patient and frame of
reference and whose frames each reference their source CT slice (SOP instance UID and image position).

The label map lies on the reader's grid (the prediction's NIfTI): each source slice's pixels are placed
on that grid by geometry alone (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, LPS -> RAS,
then the inverse affine), so the SEG equals the NIfTI prediction voxel for voxel whatever order the
reader stored the axes in. Segments carry the class name, the palette colour of the figures and colour
tables (:func:`medhpm.data.labels.label_rgb`) and a SNOMED CT code for the BTCV organs (kidneys and adrenal
glands with a laterality modifier); other names get the generic "Anatomical structure" code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from medhpm.data.datalist import DataError
from medhpm.data.labels import BTCV_ORGANS, label_rgb
from medhpm.data.scans import dicom_files_in
from medhpm.runtime.files import atomic_write_bytes

__all__ = ["write_dicom_seg", "slice_voxel_indices", "anatomic_code", "GRID_TOL_VOXELS"]

GRID_TOL_VOXELS = 0.01  # a source pixel must land this close to a voxel centre of the label map

# class name (BTCV's, either spelling) -> (SNOMED CT keyword of the structure, laterality or None)
_BTCV_CODES = {
    "spleen": ("Spleen", None),
    "right_kidney": ("Kidney", "right"),
    "left_kidney": ("Kidney", "left"),
    "gallbladder": ("Gallbladder", None),
    "esophagus": ("Esophagus", None),
    "liver": ("Liver", None),
    "stomach": ("Stomach", None),
    "aorta": ("Aorta", None),
    "inferior_vena_cava": ("InferiorVenaCava", None),
    # "portal and splenic vein" is two structures; SNOMED CT has no single concept for both: Vein
    "portal_splenic_vein": ("Vein", None),
    "pancreas": ("Pancreas", None),
    "right_adrenal": ("AdrenalGland", "right"),
    "left_adrenal": ("AdrenalGland", "left"),
}
_ALIASES = {re.sub(r"\s+", "_", spoken): key for _, spoken, key in BTCV_ORGANS}
_LATERALITY = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}


def anatomic_code(name: str):
    """(segmented property type CodedConcept, laterality CodedConcept or None) of a class name."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    key = re.sub(r"[\s-]+", "_", str(name).strip().lower())
    key = _ALIASES.get(key, key)
    keyword, side = _BTCV_CODES.get(key, ("AnatomicalStructure", None))
    code = getattr(codes.SCT, keyword)
    concept = CodedConcept(code.value, code.scheme_designator, code.meaning)
    lat = CodedConcept(_LATERALITY[side][0], "SCT", _LATERALITY[side][1]) if side else None
    return concept, lat


REFERENCED_UIDS = ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _image_slices(folder: Path, pixels: bool = True) -> list:
    """The CT image data sets in ``folder`` (with their pixel data, or headers only), in file-name order."""
    import pydicom

    found = []
    for f in dicom_files_in(folder):
        ds = pydicom.dcmread(str(f), stop_before_pixels=not pixels)
        # a header read stops before PixelData, so it is told from other objects by its pixel attributes
        if (
            ("PixelData" in ds or not pixels and "Rows" in ds)
            and "ImagePositionPatient" in ds
            and "ImageOrientationPatient" in ds
        ):
            found.append(ds)
    if not found:
        raise DataError(f"{folder}: no CT image slices to reference in a DICOM-SEG")
    return found


def check_seg_references(folder: str | Path, slices: list | None = None) -> None:
    """Raise DataError naming ``folder`` and the missing UIDs when a DICOM-SEG cannot reference its series
    (anonymisation often strips them). Reads headers only, so prediction can check before any work."""
    found = slices if slices is not None else _image_slices(Path(folder), pixels=False)
    missing = [k for k in REFERENCED_UIDS if not found[0].get(k)]
    if missing:
        raise DataError(f"{folder}: the series has no {', '.join(missing)}; a DICOM-SEG must reference them")


def _series(folder: Path) -> list:
    """The CT image data sets of the series in ``folder`` (pixel data read), sorted along the slice normal."""
    found = _image_slices(folder)
    check_seg_references(folder, found)
    iop = np.asarray(found[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(found, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))


def slice_voxel_indices(ds, affine: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) voxel indices (float) on the grid of ``affine`` (voxel -> RAS mm) of every pixel of
    the source slice ``ds`` (DICOM patient coordinates are LPS)."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index grows), along a column (row index grows)
    dr, dc = (float(x) for x in ds.PixelSpacing)  # between rows, between columns
    r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    lps = (
        np.asarray(ds.ImagePositionPatient, float)[None, None, :]
        + c[..., None] * dc * row_dir
        + r[..., None] * dr * col_dir
    )
    ras = lps * np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(np.asarray(affine, float))
    return ras @ inv[:3, :3].T + inv[:3, 3]


def _frames(label: np.ndarray, affine: np.ndarray, sources: list, folder: Path) -> np.ndarray:
    """The label map sampled at every source pixel: (slices, rows, cols)."""
    out = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), dtype=label.dtype)
    for n, ds in enumerate(sources):
        idx = slice_voxel_indices(ds, affine)
        near = np.rint(idx)
        off = float(np.abs(idx - near).max())
        near = near.astype(int)
        inside = np.all((near >= 0) & (near < np.asarray(label.shape)), axis=-1)
        if off > GRID_TOL_VOXELS or not inside.all():
            raise DataError(
                f"{folder}: slice {ds.SOPInstanceUID} does not lie on the prediction's voxel grid "
                f"(largest offset {off:.3g} voxel); the label map must be the series' own grid"
            )
        out[n] = label[near[..., 0], near[..., 1], near[..., 2]]
    return out


def write_dicom_seg(
    label: np.ndarray,
    affine: np.ndarray,
    series_folder: str | Path,
    classes: Mapping[int, str],
    path: str | Path,
    software_version: str = "",
) -> Path:
    """Write the DICOM-SEG of ``label`` (on the series' own grid, ``affine`` voxel -> RAS mm) to ``path``.

    One segment per class value present in ``label`` (numbered 1.. in value order), named after
    ``classes``. A label map without any organ is an error: a DICOM-SEG needs at least one segment.
    """
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.filebase import DicomBytesIO
    from pydicom.sr.codedict import codes

    folder = Path(series_folder)
    sources = _series(folder)
    frames = _frames(np.asarray(label), affine, sources, folder)
    values = [int(v) for v in np.unique(frames) if v > 0]
    if not values:
        raise DataError(
            f"{folder}: the prediction holds no organ, and a DICOM-SEG needs at least one segment; none was written"
        )
    seg_numbers = np.zeros(int(frames.max()) + 1, dtype=np.uint16)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medhpm UNETR", version=software_version or "unknown", family=codes.cid7162.ArtificialIntelligence
    )
    category = CodedConcept("91723000", "SCT", "Anatomical Structure")
    for number, v in enumerate(values, start=1):
        seg_numbers[v] = number
        name = str(classes.get(v, f"class_{v}"))
        prop, side = anatomic_code(name)
        d = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=category,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*label_rgb(v)),
        )
        if side is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [side]
        descriptions.append(d)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=seg_numbers[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medhpm",
        manufacturer_model_name="UNETR",
        software_versions=software_version or "unknown",
        device_serial_number="none",
        series_description="medhpm segmentation",
        content_label="MEDHPM",
    )
    buf = DicomBytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())
