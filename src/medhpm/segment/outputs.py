"""What prediction writes for each scan: one writer per ``--output-type``, all in :data:`OUTPUT_WRITERS`.

A writer says which files it writes for case ``NAME`` (so that ``plan_predictions`` checks every output
before any scan is read) and writes them from a :class:`~medhpm.segment.predict.Prediction`:

* ``nifti``: the label map ``NAME.nii.gz`` in the scan's own geometry, with its colour tables beside it
  (``NAME.ctbl`` for 3D Slicer, ``NAME.itksnap.txt`` for ITK-SNAP: :mod:`medhpm.data.color_tables`);
* ``dicom-seg``: a DICOM Segmentation ``NAME_seg.dcm`` that references the DICOM series the scan was read
  from (:mod:`medhpm.data.dicom_seg`), for DICOM input only.

``--output-type`` takes one writer, a comma list (``nifti,dicom-seg``) or ``both`` (the two). The file
formats themselves live in ``data/`` (evaluation reads the colour tables back); this module is the one
place that says which of them a prediction writes. A new writer is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medhpm.data.color_tables import color_table_paths, write_color_tables
from medhpm.data.dicom_seg import write_dicom_seg
from medhpm.runtime.files import atomic_save_nifti

if TYPE_CHECKING:
    from medhpm.segment.predict import Prediction

SEG_SUFFIX = "_seg.dcm"  # the DICOM-SEG of case NAME: NAME_seg.dcm


@dataclass(frozen=True)
class OutputWriter:
    """One kind of prediction output. ``paths(out_dir, name)``: the files it writes for case ``name``, its
    main file first; ``write(prediction, out_dir, name, classes, source)`` writes them (``classes``:
    ``{label value: name}``, ``source``: the scan predicted from) and returns the main file;
    ``needs_dicom``: it can only describe a scan read from a DICOM series (it references that series)."""

    name: str
    description: str
    paths: Callable[[Path, str], list[Path]]
    write: Callable[["Prediction", Path, str, dict[int, str], Path | None], Path]
    needs_dicom: bool = False


def _nifti_paths(out_dir: Path, name: str) -> list[Path]:
    label_map = out_dir / f"{name}.nii.gz"
    return [label_map, *color_table_paths(label_map)]


def _write_nifti(res: Prediction, out_dir: Path, name: str, classes: dict[int, str], source: Path | None) -> Path:
    path = atomic_save_nifti(res.to_nifti(), out_dir / f"{name}.nii.gz")
    write_color_tables(path, classes)
    return path


def _seg_paths(out_dir: Path, name: str) -> list[Path]:
    return [out_dir / f"{name}{SEG_SUFFIX}"]


def _write_seg(res: Prediction, out_dir: Path, name: str, classes: dict[int, str], source: Path | None) -> Path:
    from medhpm import __version__

    if source is None:
        raise ValueError(f"a DICOM-SEG of {name} needs the DICOM series it was predicted from")
    return write_dicom_seg(
        res.label, res.affine, source, classes, out_dir / f"{name}{SEG_SUFFIX}", software_version=__version__
    )


OUTPUT_WRITERS: dict[str, OutputWriter] = {
    w.name: w
    for w in (
        OutputWriter(
            "nifti", "label map NAME.nii.gz with Slicer and ITK-SNAP colour tables", _nifti_paths, _write_nifti
        ),
        OutputWriter(
            "dicom-seg", "DICOM-SEG NAME_seg.dcm (DICOM series input only)", _seg_paths, _write_seg, needs_dicom=True
        ),
    )
}
ALIASES: dict[str, tuple[str, ...]] = {"both": ("nifti", "dicom-seg")}


def output_types(text: str) -> tuple[str, ...]:
    """The writers ``--output-type`` asks for, in :data:`OUTPUT_WRITERS`' order, each once: one name, a
    comma list (``nifti,dicom-seg``) or an alias of :data:`ALIASES`. An unknown or empty entry raises
    ValueError naming it and the choices."""
    asked: list[str] = []
    for entry in str(text).split(","):
        entry = entry.strip()
        if entry in ALIASES:
            asked += ALIASES[entry]
        elif entry in OUTPUT_WRITERS:
            asked.append(entry)
        else:
            choices = ", ".join(OUTPUT_WRITERS) + "".join(f", {a} (= {','.join(v)})" for a, v in ALIASES.items())
            what = f"{entry!r} is not one of them" if entry else "it has an empty entry"
            raise ValueError(
                f"--output-type {text!r}: {what}. Give one of {choices}, or a comma list such as nifti,dicom-seg"
            )
    return tuple(n for n in OUTPUT_WRITERS if n in asked)


def write_outputs(
    types: tuple[str, ...], res: Prediction, out_dir: Path, name: str, classes: dict[int, str], source: Path | None
) -> Path:
    """Every file of ``types`` for one prediction; returns the main file of the first type. Writers that
    reference a DICOM series run first: one that fails leaves no label map of the scan behind."""
    main = {}
    for t in sorted(types, key=lambda t: not OUTPUT_WRITERS[t].needs_dicom):
        main[t] = OUTPUT_WRITERS[t].write(res, out_dir, name, classes, source)
    return main[types[0]]
