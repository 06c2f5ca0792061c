"""Loading one CT volume (a NIfTI file or a folder holding one DICOM series) through MONAI's readers.

The transform chains load with :class:`LoadCTd` and the data check and tools with :func:`load_image`;
both go through :func:`read_volume`, so every part of the package sees the same array and geometry.

What MONAI's readers lack and is added here (each a CT-specific safety check):
* a DICOM folder with several series is an error naming them (``PydicomReader`` would stack them all);
* DICOM slices are ordered by their position along the slice normal, not by InstanceNumber (which
  follows the acquisition and need not be spatial), and duplicate or missing slices are errors;
* 2D images and multi-volume (4D) images are errors; a trailing singleton 4th dimension is squeezed.
* :class:`LoadCTd` checks what it loads with the data check's per-volume rules
  (:mod:`medhpm.data.volume_checks`: NaN/inf voxels, implausible spacing, non-CT intensity scales,
  non-integer or out-of-range label values, optionally a constant image) and a label map off its image's
  grid, and :func:`check_headers` checks a datalist's
  NIfTI headers before training (unreadable, 2D/4D, label grid); every error names the file.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence, cast

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor, NibabelReader, PydicomReader
from monai.transforms import LoadImage, MapTransform, Orientation
from monai.utils import ensure_tuple

from medhpm.data.datalist import DataError
from medhpm.data.headers import check_headers, grid_problem  # noqa: F401  (re-exported)
from medhpm.data.scans import dicom_files_in, is_dicom_file, is_nifti
from medhpm.data.volume_checks import grid_problem_of_affine, image_problems, label_problems

__all__ = [
    "DicomSeriesReader",
    "CTReader",
    "LoadCTd",
    "read_volume",
    "load_image",
    "is_image_path",
    "check_headers",
    "grid_problem",
]


def is_image_path(path: str | os.PathLike) -> bool:
    """A NIfTI file, a DICOM file or a folder (possibly a DICOM series)."""
    p = Path(path)
    return p.is_dir() or is_nifti(p) or p.suffix.lower() == ".dcm" or is_dicom_file(p)


# --------------------------------------------------------------------------------------------------
# DICOM series


class DicomSeriesReader(PydicomReader):
    """``PydicomReader`` for one series per folder, with the slices in spatial order.

    Reading a folder checks that all DICOM files (found by the 'DICM' marker, any extension) belong to
    one SeriesInstanceUID, share orientation, pixel spacing and size, and are evenly spaced along the
    slice normal; the slices are then given InstanceNumbers in that order on the in-memory copies, since
    ``PydicomReader`` stacks by InstanceNumber and takes the slice direction from the first and last.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        names = ensure_tuple(filename)
        return len(names) == 1 and (Path(names[0]).is_dir() or is_dicom_file(names[0]))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs):
        names = ensure_tuple(data)
        if len(names) != 1:
            raise DataError(f"{names}: give one DICOM series folder (or file) per image")
        path = Path(names[0])
        kw = {**self.kwargs, **kwargs}
        self.has_series = False
        if not path.is_dir():
            ds = _dcmread(path, kw)
            _check_single_frame_ct(path, [(ds, str(path))])
            self.filenames = [str(path)]
            return ds
        files = dicom_files_in(path)
        if not files:
            raise DataError(f"{path}: no DICOM files in this folder (files with 'DICM' at byte 128)")
        slices, no_pixels = [], []
        for f in files:
            ds = _dcmread(f, kw)
            if "PixelData" in ds:
                slices.append((ds, str(f)))
            else:
                no_pixels.append((ds, f))
        uids = {str(ds.SeriesInstanceUID) for ds, _ in slices if "SeriesInstanceUID" in ds}
        # a non-image object of the study (a structured report, a presentation state) is skipped; a file that
        # says it is a CT image of this series but has no pixels is damaged: skipping it would drop a slice
        damaged = [(f, why) for ds, f in no_pixels if (why := _claims_ct_image(ds, uids))]
        if damaged:
            listing = "; ".join(f"{f.name} ({why})" for f, why in damaged[:5])
            more = f"; ... and {len(damaged) - 5} more" if len(damaged) > 5 else ""
            raise DataError(
                f"{path}: {len(damaged)} file(s) of this DICOM series folder claim to be CT images of the series "
                f"but hold no readable pixel data (truncated or damaged?): {listing}{more}. The series would "
                "lose these slices; copy the files again (or remove those that do not belong to the series)"
            )
        if not slices:
            raise DataError(f"{path}: none of its {len(files)} DICOM files holds pixel data")
        _check_single_frame_ct(path, slices)
        by_uid: dict[str, int] = {}
        for ds, _ in slices:
            uid = str(getattr(ds, "SeriesInstanceUID", "<no SeriesInstanceUID>"))
            by_uid[uid] = by_uid.get(uid, 0) + 1
        if len(by_uid) > 1:
            listing = ", ".join(f"{uid} ({n} files)" for uid, n in sorted(by_uid.items()))
            raise DataError(
                f"DICOM folder {path} holds {len(by_uid)} series (SeriesInstanceUID {listing}); "
                "put each series in its own folder"
            )
        if len(slices) > 1:
            slices = _spatial_order(path, slices)
        for rank, (ds, _) in enumerate(slices, start=1):
            ds.InstanceNumber = rank
        if len(slices) == 1:
            self.filenames = [slices[0][1]]
            return slices[0][0]
        self.has_series = True
        # PydicomReader keeps a series as a nested list of its files (its own read() does the same)
        self.filenames = [[f for _, f in slices]]  # type: ignore[list-item]
        return [ds for ds, _ in slices]


# Modalities of images that are not CT: a model trained on HU would segment them without meaning
_NOT_CT = {"MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OP", "SM", "IO", "PX", "ES", "XC"}


def _check_single_frame_ct(where: Path, slices: list) -> None:
    """Refuse, naming the file, what this reader would read off its grid or without meaning: a multi-frame
    object (Enhanced CT and its kin keep each frame's position in per-frame groups that a stack of
    single-frame slices does not have: read as slices it lands off its grid) and an image of another
    modality (MR, PET, ...). A missing Modality is not refused (many converters drop it)."""
    for ds, f in slices:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            kind = _CT_IMAGE_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))
            raise DataError(
                f"{f}: a multi-frame DICOM object ({frames} frames"
                + (f", {kind}" if kind else "")
                + ") is not read: its frames' positions are not those of a classic series of single-frame slices, "
                "so the volume would be off its grid; convert it to NIfTI (e.g. with dcm2niix) or to single-frame "
                f"CT slices, then give that (folder {where})"
            )
        modality = str(ds.get("Modality", "")).upper()
        if modality in _NOT_CT:
            raise DataError(
                f"{f}: Modality {modality} is not CT; medhpm's models are trained on CT intensities (HU) and "
                "would segment it without meaning, so it is not read"
            )


# CT Image Storage, Enhanced CT Image Storage, Legacy Converted Enhanced CT Image Storage
_CT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}


def _claims_ct_image(ds, series_uids: set[str]) -> str:
    """Why a DICOM file without pixel data says it is a CT image of the series ('' if it does not): its SOP
    class (of the data set, else of the file meta, which survives a truncated body) is a CT image class, or,
    without a SOP class, its Modality is CT or its SeriesInstanceUID is the series'."""
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if sop in _CT_IMAGE_SOP_CLASSES:
        return f"SOP class {_CT_IMAGE_SOP_CLASSES[sop]}"
    if sop:
        return ""  # another kind of object: a report, a presentation state, raw data
    if str(ds.get("Modality", "")).upper() == "CT":
        return "Modality CT"
    if str(ds.get("SeriesInstanceUID", "")) in series_uids:
        return "SeriesInstanceUID of the series"
    return ""


def _dcmread(path: Path, kw: dict):
    import pydicom

    try:
        return pydicom.dcmread(str(path), **kw)
    except Exception as e:  # truncated or non-DICOM file: name it
        raise DataError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from e


def _spatial_order(folder: Path, slices: list) -> list:
    """Sort (dataset, file) pairs by position along the slice normal; refuse inconsistent series."""
    first = slices[0][0]
    need = ("ImageOrientationPatient", "ImagePositionPatient")
    for ds, f in slices:
        lacking = [t for t in need if t not in ds]
        if lacking:
            raise DataError(
                f"DICOM folder {folder}: {Path(f).name} lacks {', '.join(lacking)}; "
                "the slice geometry cannot be derived"
            )
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    shape = (int(first.Rows), int(first.Columns))
    psp = np.asarray(getattr(first, "PixelSpacing", (1.0, 1.0)), dtype=float)
    for ds, f in slices[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise DataError(
                f"DICOM folder {folder}: slices with different ImageOrientationPatient "
                f"({Path(f).name}); a series must have one orientation"
            )
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DataError(
                f"DICOM folder {folder}: slices of different sizes ({shape} and "
                f"{(int(ds.Rows), int(ds.Columns))} in {Path(f).name})"
            )
        if not np.allclose(np.asarray(getattr(ds, "PixelSpacing", (1.0, 1.0)), dtype=float), psp, atol=1e-4):
            raise DataError(f"DICOM folder {folder}: slices with different PixelSpacing ({Path(f).name})")
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)) for ds, _ in slices])
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise DataError(
            f"DICOM folder {folder}: {Path(slices[order[i]][1]).name} and {Path(slices[order[i + 1]][1]).name} "
            f"lie at the same position ({pos[i]:.3f} mm along the normal): duplicate slices or several "
            "acquisitions in one series"
        )
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > 0.01 * step + 1e-3:  # tolerance for rounding in the DS strings
        raise DataError(
            f"DICOM folder {folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm, "
            "missing slices?); the volume cannot be stacked on a regular grid"
        )
    return [slices[i] for i in order]


# --------------------------------------------------------------------------------------------------
# One reader for CT volumes


@dataclass
class _Read:
    # read() hands this to get_data(): the inner reader keeps per-read state, so one is made per read
    reader: ImageReader
    obj: Any
    path: str


class CTReader(ImageReader):
    """MONAI ``ImageReader`` for one 3D CT volume: a NIfTI file or a DICOM series (folder or file).

    ``get_data`` returns a 3D array (float32 for scaled/float data, integer types kept) and MONAI's
    metadata (affine in RAS world coordinates). 2D images, single slices and images with several
    volumes raise :class:`DataError` naming the file.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        names = ensure_tuple(filename)
        return len(names) == 1 and is_image_path(names[0])

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> _Read:
        names = ensure_tuple(data)
        if len(names) != 1:
            raise DataError(f"{names}: one image per key is supported (single-channel CT)")
        path = str(names[0])
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder")
        if is_nifti(path):
            inner: ImageReader = NibabelReader(squeeze_non_spatial_dims=True)
        elif os.path.isdir(path) or path.lower().endswith(".dcm") or is_dicom_file(path):
            inner = DicomSeriesReader()
        else:
            raise DataError(f"{path}: not a NIfTI file (.nii, .nii.gz) nor a DICOM series folder")
        if is_nifti(path):
            _check_nifti_grid(path)
        try:
            return _Read(inner, inner.read(path, **kwargs), path)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from e

    def get_data(self, img: _Read) -> tuple[np.ndarray, dict]:
        try:  # nibabel and pydicom decode the voxels here: a truncated file fails now
            arr, meta = img.reader.get_data(img.obj)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{img.path}: unreadable ({type(e).__name__}: {e})") from e
        arr = np.asarray(arr)
        spatial = tuple(int(s) for s in np.asarray(meta.get("spatial_shape", arr.shape)).ravel())
        if arr.ndim == len(spatial) + 1:  # channel-last extra dimension
            if arr.shape[-1] != 1:
                raise DataError(
                    f"{img.path}: 4D image {tuple(arr.shape)} with {arr.shape[-1]} volumes; medhpm needs "
                    "one 3D CT volume per file (split the volumes into separate files)"
                )
            arr = arr[..., 0]
            meta["original_channel_dim"] = float("nan")
        if arr.ndim != 3 or len(spatial) != 3:
            raise DataError(f"{img.path}: {arr.ndim}D image {tuple(arr.shape)}; medhpm needs a 3D CT volume")
        if min(arr.shape) < 2:
            raise DataError(f"{img.path}: a single slice {tuple(arr.shape)} (2D); medhpm needs a 3D CT volume")
        problem = grid_problem_of_affine(meta["affine"]) if meta.get("affine") is not None else None
        if problem:  # as the header's, for every reader
            raise DataError(f"{img.path}: {problem}")
        if arr.dtype == np.float64:  # nibabel's scaled data: float32 halves the memory at no loss for CT
            arr = arr.astype(np.float32)
        return arr, meta


def _check_nifti_grid(path: str) -> None:
    """A NIfTI header whose voxel grid is broken (a zero spacing, NaN) is an error naming the file: MONAI's
    reader would silently replace its affine by the identity (1 mm voxels), nibabel's orientation code
    fails on it without the file's name."""
    import nibabel as nib

    try:
        affine = cast(Any, nib.load(path)).header.get_best_affine()  # nibabel types the header as a FileBasedHeader
    except Exception:
        return  # an unreadable header is reported by the reader itself
    problem = grid_problem_of_affine(affine)
    if problem:
        raise DataError(f"{path}: {problem}")


@functools.lru_cache(maxsize=1)
def _loader() -> LoadImage:
    # LoadImage registers MONAI's default readers at construction; the GPU DICOM one logs a notice that
    # does not concern us (we always pass CTReader at call time).
    log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True, dtype=None, ensure_channel_first=True)
    finally:
        log.setLevel(level)


def read_volume(path: str | os.PathLike) -> MetaTensor:
    """Load one CT volume as a channel-first MetaTensor (1, X, Y, Z) with MONAI metadata.

    Raises DataError naming the file when it is missing, unreadable, 2D, 4D, or a DICOM folder with
    several series.
    """
    return _loader()(str(path), reader=CTReader())


def load_image(path: str | os.PathLike, orientation: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load one CT volume: (array (X, Y, Z), affine (4, 4) voxel -> RAS mm, metadata dict).

    ``orientation`` (e.g. "RAS") reorients the array and affine first, as the transform chains do.
    The array is float32 for CT intensities read from DICOM or scaled NIfTI; integer types are kept.
    """
    img = read_volume(path)
    if orientation:
        img = cast(MetaTensor, Orientation(axcodes=orientation, labels=None)(img))  # labels from the MetaTensor space
    arr = np.ascontiguousarray(img.array[0])
    affine = np.asarray(img.affine, dtype=np.float64)
    return arr, affine, dict(img.meta)


# --------------------------------------------------------------------------------------------------
# Dictionary transform used at the head of every chain


class LoadCTd(MapTransform):
    """Load the CT volumes named by ``keys`` (NIfTI files or DICOM series folders), channel first.
    A value that is already a channel-first ``MetaTensor`` (a volume in memory) is checked, not read.

    Images become float32; the keys in ``label_keys`` are rounded to integer values (float32), since a
    label stored with a float scale factor may read as 0.9999999 and would be truncated to 0 later.

    Each volume is checked as it is loaded with the rules of ``medhpm data check``
    (:mod:`medhpm.data.volume_checks`), and an error raises :class:`DataError` naming the file: NaN or
    infinite voxels; an implausible voxel spacing or intensities outside any CT scale; label values that
    are not integers (more than 1e-3 off), negative, or (with ``num_classes``) not below ``num_classes``
    (the message names ``classes_key``); a label map that does not lie on its image's voxel grid; and
    with ``reject_constant`` an image whose voxels all have one value.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = ("label",),
        allow_missing_keys: bool = False,
        num_classes: int | None = None,
        classes_key: str = "finetune.num_classes",
        reject_constant: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = tuple(ensure_tuple(label_keys))
        self.num_classes = None if num_classes is None else int(num_classes)
        self.classes_key = classes_key
        self.reject_constant = bool(reject_constant)

    @property
    def checks(self) -> dict:
        """The optional checks that are on (part of a disk cache's key: a cached item skips the loader)."""
        out: dict[str, Any] = {}
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        if self.reject_constant:
            out["reject_constant"] = True
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        paths = {key: _source_name(d[key]) for key in self.key_iterator(d)}
        for key in self.key_iterator(d):
            # a volume already in memory (Predictor.predict on an array) is checked as a loaded one
            img = d[key] if isinstance(d[key], MetaTensor) else read_volume(d[key])
            self._check(paths[key], img, is_label=key in self.label_keys)  # on the stored values (complex too)
            img = img.to(torch.float32)
            if key in self.label_keys:
                img = torch.round(img)
            d[key] = img
        images = [k for k in paths if k not in self.label_keys]
        for lk in (k for k in paths if k in self.label_keys):
            for ik in images[:1]:
                msg = grid_problem(
                    paths[ik], d[ik].shape[1:], _affine(d[ik]), paths[lk], d[lk].shape[1:], _affine(d[lk])
                )
                if msg:
                    raise DataError(msg)
        return d

    def _check(self, path: str, img: torch.Tensor, is_label: bool) -> None:
        """Raise a DataError naming ``path`` with every error of :mod:`medhpm.data.volume_checks`."""
        x = (img.as_subclass(torch.Tensor) if isinstance(img, MetaTensor) else img).detach().cpu().numpy()
        if is_label:
            problems = label_problems(x, self.num_classes, classes_key=self.classes_key)
        else:
            affine = _affine(img) if isinstance(img, MetaTensor) else None
            problems = image_problems(x, affine, reject_constant=self.reject_constant)
        errors = [p.message for p in problems if p.severity == "error"]
        if errors:
            raise DataError(f"{path}: " + "; ".join(errors))
        for p in problems:  # what data check calls a warning, the loader says once per file
            warnings.warn(f"{path}: {p.message}", DataWarning, stacklevel=2)


class DataWarning(UserWarning):
    """A volume the loader accepts but ``medhpm data check`` flags as suspicious; the message names the file."""


def _source_name(value) -> str:
    """What an error names: the path, or for a volume in memory its ``filename_or_obj``."""
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj") or "the image in memory")
    return str(value)


def _affine(img) -> np.ndarray:
    aff = img.affine if isinstance(img, MetaTensor) else img.meta["affine"]
    return np.asarray(torch.as_tensor(aff).cpu().numpy(), dtype=np.float64)
