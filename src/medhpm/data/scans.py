"""Which files are scans, and what a case is called: the one rule for the datalist readers, the data
check, prediction and evaluation.

* A scan is a NIfTI file (``.nii``, ``.nii.gz``, any case) or a folder holding one DICOM series. A DICOM
  file is recognised by the 4 bytes ``DICM`` after its 128-byte preamble, whatever its extension; hidden
  files and ``DICOMDIR`` (the index of a medium, not an image) never count.
* A case is named after its scan: the file name without ``.nii``/``.nii.gz`` and without nnU-Net's
  first-channel suffix ``_0000`` (``CASE_0000.nii.gz`` -> ``CASE``, as nnU-Net names its outputs); a DICOM
  series: the folder's name. Where scans are named relative to a folder (a plain folder of scans, or several images
  of a datalist sharing one file name) the name is the path below that folder without the extension,
  with ``_`` for the path separators: ``root/p1/ct.nii.gz`` -> ``p1_ct``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

__all__ = [
    "CHANNEL_SUFFIX",
    "is_nifti",
    "strip_nifti_ext",
    "is_dicom_file",
    "dicom_files_in",
    "is_dicom_series",
    "case_name",
    "find_scans",
]

_NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
CHANNEL_SUFFIX = re.compile(r"_0000$")  # nnU-Net's first-channel suffix on image files


def is_nifti(path: str | os.PathLike) -> bool:
    """True when the name ends in .nii or .nii.gz (any case)."""
    return bool(_NIFTI_RE.search(str(path)))


def strip_nifti_ext(name: str) -> str:
    """``name`` without a trailing .nii or .nii.gz."""
    return _NIFTI_RE.sub("", name)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a DICOM Part-10 file: the 4 bytes 'DICM' after the 128-byte preamble (any extension)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _candidate(p: Path) -> bool:
    # DICOMDIR is an index of a medium, not an image
    return not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file()


def dicom_files_in(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly inside ``folder`` (not recursive), sorted by name."""
    return [p for p in sorted(Path(folder).iterdir()) if _candidate(p) and is_dicom_file(p)]


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """True when ``folder`` directly holds at least one DICOM file (all its entries are looked at)."""
    try:
        return any(_candidate(p) and not is_nifti(p.name) and is_dicom_file(p) for p in Path(folder).iterdir())
    except OSError:
        return False


def case_name(path: str | os.PathLike, root: Optional[str | os.PathLike] = None) -> str:
    """The name of the case whose scan is ``path`` (see the module docstring).

    Without ``root``: the file (or DICOM folder) name without .nii/.nii.gz and a final ``_0000``. With
    ``root``: the path
    relative to ``root`` (a relative ``path`` is taken as relative to it already; a path outside it is
    used whole), without the extension, separators replaced by ``_``; ``root`` itself is named after
    its own folder name.
    """
    drop = (lambda s: CHANNEL_SUFFIX.sub("", s) or s) if is_nifti(path) else (lambda s: s)
    if root is None:
        return drop(strip_nifti_ext(Path(path).name))
    p, r = os.path.normpath(str(path)), os.path.normpath(str(root))
    if p == r:
        return Path(r).name
    if os.path.isabs(p) and p.startswith(r.rstrip(os.sep) + os.sep):
        p = os.path.relpath(p, r)
    return drop(strip_nifti_ext(p).strip("/").replace(os.sep, "_").replace("/", "_"))


def find_scans(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """Every scan under ``folder`` (recursively; ``folder`` itself may be a DICOM series) as
    ``(path, case name relative to folder)``, in walking order: a folder before its files, names sorted.

    Symlinked folders are followed, but never in a loop; hidden files and folders are skipped.
    """
    root = Path(folder)
    found: list[tuple[str, str]] = []
    seen: set[str] = set()  # real paths walked
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if is_dicom_series(here):
            found.append((str(here), case_name(here, root)))
        for f in sorted(filenames):
            if not f.startswith(".") and is_nifti(f):
                p = here / f
                found.append((str(p), case_name(p, root)))
    return found
