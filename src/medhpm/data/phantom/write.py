"""Writing a phantom data set: NIfTI files (atomically, byte-identical from run to run) and dataset.json."""

from __future__ import annotations

import gzip
import json
import math
import os
import pathlib
import tempfile
from typing import Iterable, Sequence

import numpy as np

from medhpm.data.labels import BTCV_LABELS
from medhpm.data.phantom.case import _check_seed, _check_triplet, case_seed, generate_case
from medhpm.data.phantom.variability import check_variability


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, dtype) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # mtime=0 makes the compressed file byte-identical across runs.
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _atomic_write(path: pathlib.Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _split_counts(cases: int, split) -> tuple[int, int, int]:
    try:
        fr = [float(v) for v in split]
    except (TypeError, ValueError):
        raise ValueError(f"split must be three non-negative fractions, got {split!r}.") from None
    if len(fr) != 3 or any(not math.isfinite(v) or v < 0 for v in fr) or sum(fr) <= 0:
        raise ValueError(f"split must be three non-negative fractions with a positive sum, got {split!r}.")
    if fr[0] <= 0:
        raise ValueError(f"split must give the training set a positive fraction, got {split!r}.")
    if cases < 3:
        return cases, 0, 0
    total = sum(fr)
    val = int(round(cases * fr[1] / total))
    test = int(round(cases * fr[2] / total))
    # Every requested split gets a case; training keeps at least one.
    if fr[1] > 0:
        val = max(val, 1)
    if fr[2] > 0:
        test = max(test, 1)
    while cases - val - test < 1:
        if val >= test and val > (1 if fr[1] > 0 else 0):
            val -= 1
        elif test > (1 if fr[2] > 0 else 0):
            test -= 1
        else:
            break
    return cases - val - test, val, test


def write_phantom_dataset(
    out_dir,
    cases: int = 6,
    seed: int = 0,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    progress: bool = False,
    variability: str = "standard",
    dicom: bool = False,
) -> pathlib.Path:
    """Write ``cases`` phantom volumes, their label maps and an MSD-style ``dataset.json``.

    Layout: ``out_dir/imagesTr/phantom_000.nii.gz`` (int16 HU), ``out_dir/labelsTr/phantom_000.nii.gz``
    (uint8 BTCV labels) and ``out_dir/dataset.json`` with training, validation and test lists whose
    paths are relative to the JSON's folder. Case ``i`` uses ``case_seed(seed, i)`` and alternates
    RAS (even ``i``) and LPS (odd ``i``) headers. Every file is written atomically and
    ``dataset.json`` is written last, so its presence means the data set is complete.
    ``variability``: ``standard`` or ``wide`` (see ``medhpm.data.phantom.variability``).
    ``dicom``: also write each case's CT as a DICOM series, ``out_dir/dicom/phantom_000/IM0001.dcm ...``
    (``medhpm.data.phantom.dicom``: the NIfTI's grid, with the UIDs a DICOM-SEG references); dataset.json
    still lists the NIfTI files.
    Returns the path of ``dataset.json``.
    """
    cases = _check_cases(cases)
    variability = check_variability(variability)
    seed = _check_seed(seed)
    size = _check_triplet(size, "size", integer=True)
    spacing = _check_triplet(spacing, "spacing", integer=False)
    counts = _split_counts(cases, split)

    out = pathlib.Path(out_dir)
    _refuse_foreign_dataset(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)

    indices: Iterable[int] = range(cases)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="phantom", unit="case")
    entries = [_write_case(out, i, seed, size, spacing, variability, dicom) for i in indices]
    path = out / "dataset.json"
    meta = _dataset_meta(entries, counts, seed, variability)
    _atomic_write(path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return path


def _refuse_foreign_dataset(out: pathlib.Path) -> None:
    """A folder may be rewritten with phantoms only if it holds no data set or a phantom one: a user's
    dataset.json (or a file where the folder should be) must not be replaced."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"refusing to write phantoms into {out}: it is a file, not a folder; nothing was written")
    meta = out / "dataset.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("name")
        except (ValueError, AttributeError, OSError):
            name = None
        if name != "medhpm-phantom":
            raise ValueError(
                f"refusing to write phantoms into {out}: {meta} belongs to another data set (name "
                f"{name!r}) and would be replaced; nothing was written (choose another folder)"
            )


def _check_cases(cases) -> int:
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)):
        raise ValueError(f"cases must be a whole number of at least 1, got {cases!r}.")
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}.")
    return int(cases)


def _write_case(out: pathlib.Path, i: int, seed: int, size, spacing, variability: str, dicom: bool = False) -> dict:
    """Generate case ``i`` (RAS when ``i`` is even, LPS when odd), write its image and label map, and
    return its datalist entry (with what a wide case drew under ``phantom``)."""
    case = generate_case(
        case_seed(seed, i),
        size=size,
        spacing=spacing,
        orientation="RAS" if i % 2 == 0 else "LPS",
        variability=variability,
    )
    name = f"phantom_{i:03d}.nii.gz"
    _atomic_write(out / "imagesTr" / name, _nifti_bytes(case.image, case.affine, np.int16))
    _atomic_write(out / "labelsTr" / name, _nifti_bytes(case.label, case.affine, np.uint8))
    if dicom:
        from medhpm.data.phantom.dicom import write_ct_series

        write_ct_series(
            case.image.astype(np.int16),
            case.affine,
            out / "dicom" / f"phantom_{i:03d}",
            case=f"phantom_{i:03d}",
            seed=seed,
        )
    entry: dict[str, str | dict] = {"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"}
    if case.variation:
        entry["phantom"] = case.variation
    return entry


def _dataset_meta(entries: list[dict], counts: tuple[int, int, int], seed: int, variability: str) -> dict:
    """The MSD-style dataset.json: description, BTCV labels and the training/validation/test lists."""
    n_train, n_val, n_test = counts
    kind = (
        "contrast-enhanced (portal-venous)"
        if variability == "standard"
        else "abdominal CT of every contrast phase, scanner, build and field of view (wide variability)"
    )
    meta = {
        "name": "medhpm-phantom",
        "description": (
            f"Synthetic {kind} abdominal CT phantoms with BTCV-numbered organ "
            "labels, generated by medhpm.data.phantom. Not patient data."
        ),
        "reference": "medhpm synthetic phantom (medhpm.data.phantom)",
        "licence": "Apache-2.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "numTraining": n_train,
        "numValidation": n_val,
        "numTest": n_test,
        "seed": seed,
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": entries[n_train + n_val :],
    }
    if variability != "standard":  # standard data sets stay byte-identical to earlier versions
        meta["variability"] = variability
    return meta
