"""Checks of a datalist's NIfTI headers, before any voxel is read or any training starts.

Only NumPy and nibabel are imported here (no torch, no MONAI), so that the command line can check a data
set in a second before it starts the training stack; the loader (:class:`medhpm.data.ct_reader.LoadCTd`) applies
:func:`grid_problem` again to what it loads.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from medhpm.data.datalist import DataError
from medhpm.data.scans import is_nifti
from medhpm.data.volume_checks import GRID_TOL_MM
from medhpm.data.volume_checks import grid_problem as volume_grid_problem
from medhpm.data.volume_checks import grid_problem_of_affine

__all__ = ["GRID_TOL_MM", "grid_problem", "nifti_header", "check_headers"]


def _ras_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of the grid reoriented to the closest RAS axes (as the chains' Orientationd does),
    so that an image and a label map stored in different axis orders compare equal."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape[:3])
    ornt = io_orientation(affine)
    return tuple(shape[int(i)] for i in np.argsort(ornt[:, 0])), affine @ inv_ornt_aff(ornt, shape)


def grid_problem(
    image_path: str, image_shape: Sequence[int], image_affine, label_path: str, label_shape: Sequence[int], label_affine
) -> str | None:
    """Why a label map does not lie on its image's voxel grid (the rule of
    :func:`medhpm.data.volume_checks.grid_problem` on the headers reoriented to RAS, naming both files), or None."""
    ishape, iaff = _ras_grid(image_shape, image_affine)
    lshape, laff = _ras_grid(label_shape, label_affine)
    problem = volume_grid_problem(ishape, iaff, lshape, laff)
    return None if problem is None else f"{label_path}: {problem} (image {image_path})"


def nifti_header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(spatial shape, affine) from a NIfTI header, with the checks of :class:`CTReader` that need no voxels."""
    import nibabel as nib

    try:
        img: Any = nib.load(path)  # nibabel types load() as a FileBasedImage, without shape and affine
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton dimensions are squeezed by the reader
        shape = shape[:-1]
    if len(shape) == 4:
        raise DataError(
            f"{path}: 4D image {shape} with {shape[-1]} volumes; medhpm needs one 3D CT volume per "
            "file (split the volumes into separate files)"
        )
    if len(shape) != 3:
        raise DataError(f"{path}: {len(shape)}D image {shape}; medhpm needs a 3D CT volume")
    if min(shape) < 2:
        raise DataError(f"{path}: a single slice {shape} (2D); medhpm needs a 3D CT volume")
    problem = grid_problem_of_affine(affine)
    if problem:
        raise DataError(f"{path}: {problem}")
    return shape, affine


def check_headers(entries: Sequence[Mapping], what: str = "training") -> None:
    """Check every NIfTI image and label of ``entries`` from its header alone, before any training: readable,
    3D, and each label map on its image's voxel grid. Reads no voxels (a truncated voxel block, NaNs or
    label values are found when the case is loaded). DICOM series are left to the loader.

    Raises one :class:`DataError` that lists every problem, each naming its file.
    """
    problems: list[str] = []
    for e in entries:
        headers: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
        for key in ("image", "label"):
            path = e.get(key)
            if not isinstance(path, str) or not is_nifti(path):
                continue
            if not os.path.exists(path):
                problems.append(f"{path}: {key} file does not exist")
                continue
            try:
                headers[key] = nifti_header(path)
            except DataError as err:
                problems.append(str(err))
        if "image" in headers and "label" in headers:
            msg = grid_problem(e["image"], *headers["image"], e["label"], *headers["label"])
            if msg:
                problems.append(msg)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{len(problems)} problem(s) in the {what} data; nothing was trained (`medhpm data check` lists "
            "every problem of a data set):\n  " + "\n  ".join(problems[:20]) + more
        )
