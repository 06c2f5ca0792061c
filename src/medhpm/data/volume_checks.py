"""The per-volume rules: what makes one CT volume or label map unusable (an error) or suspicious (a warning).

One rule set for the ``medhpm data check`` command (:mod:`medhpm.data.check`, which reports every problem)
and the loader at the head of every transform chain (:class:`medhpm.data.ct_reader.LoadCTd`, which raises on the
errors). Only NumPy is needed; messages do not name the file (the caller does).

Image rules: the affine must be finite and give a voxel spacing within ``SPACING_LIMITS`` mm; voxels must be
finite; with ``reject_constant`` the image must not be constant; intensities must lie within ``HU_LIMITS``
(one fill value below the lower limit, as some scanners write outside the field of view, is only a warning);
intensities that do not look like Hounsfield units are a warning.

Grid rule (:func:`grid_problem`): a label map must lie on its image's voxel grid, the same shape and affines
within ``tol`` mm, both in RAS order.

Complex voxels are an error for both. Label rules: a label map of background only is a warning; voxels must
be finite whole numbers (within ``LABEL_TOL``: a label stored with a float scale
factor may read as 0.9999999), not negative, below ``num_classes`` when given, and among the ``declared``
label values when given.
"""

from __future__ import annotations

from typing import Collection, NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "HU_LIMITS",
    "SPACING_LIMITS",
    "LABEL_TOL",
    "GRID_TOL_MM",
    "Problem",
    "spacing_of",
    "grid_problem_of_affine",
    "image_problems",
    "label_problems",
    "grid_problem",
]

HU_LIMITS = (-4000.0, 40000.0)  # beyond these no CT scale (incl. extended-range) reaches
SPACING_LIMITS = (0.1, 10.0)  # mm; outside: a wrong header unit or not a CT volume
LABEL_TOL = 1e-3  # largest distance of a label voxel from a whole number
GRID_TOL_MM = 1e-3  # largest affine difference between an image and its label map


class Problem(NamedTuple):
    severity: str  # "error" (the volume is unusable) | "warning"
    message: str


def spacing_of(affine) -> np.ndarray:
    """Voxel size (mm) along each array axis of a voxel-to-world affine."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def grid_problem_of_affine(affine) -> Optional[str]:
    """Why a voxel-to-world affine gives no usable voxel grid (NaN or infinite entries, an axis of zero
    length, axes that span no volume), or None. Such a header cannot be oriented or resampled; the readers
    (:class:`medhpm.data.ct_reader.CTReader`, :func:`medhpm.data.headers.nifti_header`) refuse it with the
    file named, before nibabel or MONAI would fail on it."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return f"the affine has shape {a.shape}, not 4x4"
    if not np.all(np.isfinite(a)):
        return "the affine (voxel-to-world matrix) holds NaN or infinite values"
    sp = spacing_of(a)
    if np.any(sp <= 0):
        return (
            f"voxel spacing {tuple(round(float(s), 4) for s in sp)} mm has an axis of zero length: the header's "
            "pixdim or sform/qform is broken, so the scan cannot be oriented or resampled"
        )
    if abs(float(np.linalg.det(a[:3, :3]))) <= 1e-6 * float(np.prod(sp)):
        return (
            "the voxel axes of the affine are parallel (its 3x3 part is singular): the header's sform/qform is "
            "broken, so the scan cannot be oriented or resampled"
        )
    return None


def _values(vals: Sequence | np.ndarray, limit: int = 8) -> str:
    vals = list(vals)
    s = ", ".join(f"{v:g}" for v in vals[:limit])
    return s + (f", ... ({len(vals)} values)" if len(vals) > limit else "")


def _non_finite(a: np.ndarray, what: str) -> list[Problem]:
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    return [Problem("error", f"{n_nan} NaN and {n_inf} infinite voxel(s); {what}")]


def image_problems(arr: np.ndarray, affine=None, reject_constant: bool = True) -> list[Problem]:
    """The problems of one CT image (array of any numeric type, ``affine`` voxel -> world mm or None)."""
    out: list[Problem] = []
    if affine is not None:
        sp = spacing_of(affine)
        if not np.all(np.isfinite(np.asarray(affine, dtype=np.float64))):
            out.append(Problem("error", "the affine (voxel-to-world matrix) holds NaN or infinite values"))
        elif np.any(sp < SPACING_LIMITS[0]) or np.any(sp > SPACING_LIMITS[1]):
            out.append(
                Problem(
                    "error",
                    f"implausible voxel spacing {tuple(round(float(s), 4) for s in sp)} mm "
                    f"(expected {SPACING_LIMITS[0]}-{SPACING_LIMITS[1]} mm): check the "
                    "header's units and pixdim",
                )
            )
    if np.iscomplexobj(arr):
        out.append(
            Problem(
                "error",
                f"complex voxel values ({arr.dtype}): a CT image holds real intensities "
                "(raw scanner data, or a wrongly converted file?)",
            )
        )
        return out
    a = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)
    if a.size == 0:
        return out
    vals = a
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(a).all():
        out += _non_finite(a, "CT intensities must be finite")
        vals = a[np.isfinite(a)]
        if not vals.size:
            return out
    lo, hi = float(vals.min()), float(vals.max())
    if hi == lo:
        if reject_constant:
            out.append(
                Problem(
                    "error",
                    f"constant image (every voxel is {lo:g}); there is nothing to learn from "
                    "it (an empty or wrongly converted scan?)",
                )
            )
        return out
    if hi > HU_LIMITS[1]:
        out.append(Problem("error", f"maximum {hi:g} lies above {HU_LIMITS[1]:g}: not a CT intensity scale"))
    if lo < HU_LIMITS[0]:
        # Some scanners and converters fill the outside of the field of view with one value such as
        # -32768; the HU clip maps it to air, so that alone does not make the case unusable.
        below = vals[vals < HU_LIMITS[0]]
        if np.all(below == lo):
            out.append(
                Problem(
                    "warning",
                    f"{below.size} voxel(s) at {lo:g} (below {HU_LIMITS[0]:g}): presumably "
                    "a fill value outside the field of view; the HU clip treats it as air",
                )
            )
            inside = vals[vals >= HU_LIMITS[0]]
            lo = float(inside.min()) if inside.size else lo
        else:
            out.append(Problem("error", f"minimum {lo:g} lies below {HU_LIMITS[0]:g}: not a CT intensity scale"))
    reasons = []
    if hi - lo < 10:
        reasons.append(f"range {hi - lo:g} < 10")
    if hi < 100:
        reasons.append(f"maximum {hi:g} < 100 (no bone or contrast)")
    if lo > -500:
        reasons.append(f"minimum {lo:g} > -500 (no air)")
    if reasons:
        out.append(
            Problem(
                "warning",
                f"intensities [{lo:g}, {hi:g}] do not look like Hounsfield units "
                f"({'; '.join(reasons)}); the HU window clip may erase the image (already "
                "normalised? missing rescale intercept?)",
            )
        )
    return out


def label_problems(
    arr: np.ndarray,
    num_classes: Optional[int] = None,
    declared: Optional[Collection[int]] = None,
    classes_key: str = "num_classes",
) -> list[Problem]:
    """The problems of one label map. ``num_classes`` (with background) bounds the values (the message names
    the setting ``classes_key``); ``declared``: the label values a datalist lists (empty or None: any)."""
    out: list[Problem] = []
    a = arr
    if np.iscomplexobj(a):
        return [Problem("error", f"complex voxel values ({a.dtype}): a label map holds class numbers")]
    if np.issubdtype(a.dtype, np.floating):
        fin = np.isfinite(a)
        if not fin.all():
            out += _non_finite(a, "a label map must hold class numbers")
            a = np.where(fin, a, 0)
        off = np.abs(a - np.round(a)) > LABEL_TOL
        if off.any():
            out.append(
                Problem(
                    "error",
                    f"{int(off.sum())} label voxel(s) are not integers (e.g. "
                    f"{float(a[off].flat[0]):g}): a label map must hold class numbers (was it "
                    "resampled with linear interpolation?)",
                )
            )
        a = np.round(a)
    if a.size == 0:
        return out
    lo, hi = float(a.min()), float(a.max())
    if lo == hi == 0:
        out.append(
            Problem(
                "warning",
                "the label map holds background only: this case teaches no organ (an empty "
                "or wrongly converted label map?)",
            )
        )
    if lo < 0:
        neg = np.unique(a[a < 0]).astype(np.int64)
        out.append(Problem("error", f"negative label values {_values(neg)}; label values must be >= 0"))
    if num_classes is not None and hi >= num_classes:
        over = np.unique(a[a >= num_classes]).astype(np.int64)
        out.append(
            Problem(
                "error",
                f"label values {_values(over)} exceed the {num_classes} classes "
                f"(0-{num_classes - 1}) of {classes_key}={num_classes}; raise {classes_key} or "
                "remap the labels",
            )
        )
    if declared:
        values = np.unique(a).astype(np.int64)
        undeclared = [int(v) for v in values if int(v) not in declared and v >= 0]
        if undeclared:
            out.append(
                Problem(
                    "error",
                    f"label values {_values(undeclared)} are not in the datalist's labels "
                    f"({_values(sorted(declared))})",
                )
            )
    return out


def grid_problem(
    image_shape: Sequence[int], image_affine, label_shape: Sequence[int], label_affine, tol: float = GRID_TOL_MM
) -> Optional[str]:
    """Why a label map does not lie on its image's voxel grid, or None; shapes and affines both in RAS
    order (the caller reorients headers first)."""
    ishape, lshape = tuple(int(v) for v in image_shape[:3]), tuple(int(v) for v in label_shape[:3])
    if ishape != lshape:
        return (
            f"label shape {lshape} differs from the image's {ishape} (both in RAS order): the label map must "
            "lie on the image's voxel grid"
        )
    diff = float(
        np.max(np.abs(np.asarray(label_affine, dtype=np.float64) - np.asarray(image_affine, dtype=np.float64)))
    )
    if not np.isfinite(diff) or diff > tol:
        return (
            f"label geometry differs from the image's (same shape {ishape}, largest affine difference "
            f"{diff:.4g} mm > {tol:g}): the label map does not lie on the image's voxel grid (wrong origin, "
            "spacing or direction in one of the headers?)"
        )
    return None
