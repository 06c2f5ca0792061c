"""Colour tables written beside every predicted label map, so that viewers show organs, not numbers.

For ``CASE.nii.gz`` two files are written next to it:

* ``CASE.ctbl``: 3D Slicer's colour-table text format (``# Color table file`` header, then one
  ``VALUE NAME R G B A`` line per label, 0-255, spaces in names replaced by ``_``). In Slicer: load the
  ``.ctbl`` (drag and drop), then load the label map as a segmentation or label map volume and choose it as
  the colour node; segments are named after it.
* ``CASE.itksnap.txt``: an ITK-SNAP label description file (``IDX R G B A VIS MSH "LABEL"``, A in 0-1). In
  ITK-SNAP: Segmentation > Import Label Descriptions.

Colours come from :func:`medhpm.data.labels.label_rgb`, the table the overlay figures paint with. NIfTI itself
has no field for class names that Slicer or ITK-SNAP reads (Slicer reads segment names from a ``.seg.nrrd``
header, not from NIfTI), so the names live in these two files only (see docs/outputs.md).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Mapping

from medhpm.data.labels import label_rgb
from medhpm.data.scans import strip_nifti_ext
from medhpm.runtime.files import atomic_write_text

__all__ = [
    "color_table_paths",
    "slicer_ctbl_text",
    "itksnap_text",
    "write_color_tables",
    "read_slicer_ctbl",
    "read_itksnap",
]


def color_table_paths(label_map: str | Path) -> tuple[Path, Path]:
    """(Slicer ``.ctbl``, ITK-SNAP ``.itksnap.txt``) beside the label map ``label_map``."""
    p = Path(label_map)
    stem = strip_nifti_ext(p.name)
    return p.with_name(f"{stem}.ctbl"), p.with_name(f"{stem}.itksnap.txt")


def _slicer_name(name: str) -> str:
    return re.sub(r"\s+", "_", str(name).strip()) or "unnamed"


def _entries(classes: Mapping[int, str]) -> list[tuple[int, str]]:
    return sorted((int(v), str(n)) for v, n in classes.items() if int(v) > 0)


def slicer_ctbl_text(classes: Mapping[int, str]) -> str:
    """3D Slicer colour-table text (``.ctbl``) of ``{label value: name}``, background 0 transparent."""
    entries = _entries(classes)
    lines = ["# Color table file written by medhpm", f"# {len(entries) + 1} values", "0 Background 0 0 0 0"]
    lines += [f"{v} {_slicer_name(n)} {' '.join(str(c) for c in label_rgb(v))} 255" for v, n in entries]
    return "\n".join(lines) + "\n"


def itksnap_text(classes: Mapping[int, str]) -> str:
    """ITK-SNAP label description text of ``{label value: name}``."""
    head = [
        "# ITK-SNAP label description file written by medhpm",
        '# columns: IDX R G B (0-255) A (opacity 0-1) VIS (visible 0/1) MSH (in 3D mesh 0/1) "LABEL"',
        '    0     0    0    0        0  0  0    "Clear Label"',
    ]
    rows = []
    for v, n in _entries(classes):
        r, g, b = label_rgb(v)
        rows.append(f'{v:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{str(n).replace(chr(34), "")}"')
    return "\n".join(head + rows) + "\n"


def write_color_tables(label_map: str | Path, classes: Mapping[int, str]) -> tuple[Path, Path]:
    """Write both colour tables beside ``label_map`` (atomically); returns their paths."""
    ctbl, snap = color_table_paths(label_map)
    atomic_write_text(ctbl, slicer_ctbl_text(classes))
    atomic_write_text(snap, itksnap_text(classes))
    return ctbl, snap


def read_slicer_ctbl(path: str | Path) -> dict[int, tuple[str, tuple[int, int, int, int]]]:
    """``{value: (name, (R, G, B, A))}`` of a Slicer colour-table text file; ValueError naming the file and
    line for a malformed line."""
    out: dict[int, tuple[str, tuple[int, int, int, int]]] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        try:
            value, name, rgba = int(parts[0]), parts[1], tuple(int(x) for x in parts[2:6])
        except (ValueError, IndexError):
            raise ValueError(f"{path}, line {i}: not a colour-table line 'VALUE NAME R G B A': {line!r}") from None
        if len(rgba) != 4 or not all(0 <= c <= 255 for c in rgba):
            raise ValueError(f"{path}, line {i}: R G B A must be four values in 0-255: {line!r}")
        out[value] = (name, rgba)
    return out


def read_itksnap(path: str | Path) -> dict[int, tuple[str, tuple[int, int, int], float]]:
    """``{value: (label, (R, G, B), opacity)}`` of an ITK-SNAP label description file."""
    out: dict[int, tuple[str, tuple[int, int, int], float]] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = shlex.split(line)
        try:
            out[int(parts[0])] = (parts[7], (int(parts[1]), int(parts[2]), int(parts[3])), float(parts[4]))
        except (ValueError, IndexError):
            raise ValueError(f"{path}, line {i}: not an ITK-SNAP label line: {line!r}") from None
    return out
