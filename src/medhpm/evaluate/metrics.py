"""Per-case, per-organ Dice, HD95, normalised surface Dice and ASSD (millimetres) on label maps, with the
conventions written down.

The numbers come from MONAI (``compute_dice``, ``compute_hausdorff_distance(percentile=95)``,
``compute_surface_dice`` and ``compute_average_surface_distance(symmetric=True)``); this
module only decides what happens when an organ is empty on one or both sides, crops each organ to its
bounding box first (a 512x512x150 CT takes a second, not minutes), and summarises over cases.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence, cast

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)
from scipy import ndimage

# Per-case status of one organ; the strings are written into metrics.json and metrics.csv.
OK, ABSENT, MISSED, FALSE_POSITIVE = "ok", "absent", "missed", "false_positive"

CONVENTIONS: dict[str, str] = {
    "dice": "Dice = 2|P&G| / (|P|+|G|) on the binary masks of one label value (monai.metrics.compute_dice); "
    "a fraction in [0, 1] in metrics.json and metrics.csv, a percentage in table.md.",
    "hd95": "MONAI's 95% Hausdorff distance (monai.metrics.compute_hausdorff_distance, percentile=95, "
    "euclidean, spacing=voxel spacing): surface voxels = mask XOR its binary erosion (face-connected "
    "structuring element, outside the volume counts as background); for each direction the 95th percentile "
    "(linear interpolation) of the distances from every surface voxel of one mask to the nearest surface "
    "voxel of the other; HD95 = the maximum of the two directions. Millimetres.",
    "spacing": "Distances use the anisotropic voxel spacing of the label file (norms of its affine's columns); "
    "metrics are computed in the original voxel grid of each ground-truth file.",
    "status": "Each case x label has a status: 'ok' (organ in ground truth and prediction), 'absent' (in "
    "neither), 'missed' (in ground truth only), 'false_positive' (in prediction only).",
    "surface_dice": "Normalised surface Dice at a tolerance of tau mm (monai.metrics.compute_surface_dice, "
    "use_subvoxels=False, spacing=voxel spacing): the surface voxels of both masks (as for HD95) within tau mm "
    "of the other mask's surface, over all surface voxels of both; tau is surface_tolerance_mm in metrics.json "
    "(config finetune.surface_tolerance_mm, medhpm evaluate --surface-tolerance). A fraction in [0, 1].",
    "assd": "Average symmetric surface distance (monai.metrics.compute_average_surface_distance, symmetric=True, "
    "spacing=voxel spacing): the mean of the distances from every surface voxel of each mask to the other "
    "mask's surface, both directions pooled. Millimetres.",
    "absent": "Ground truth empty and prediction empty: dice, hd95, surface_dice and assd = null (nothing to "
    "measure, as in nnU-Net and MONAI's ignore_empty); excluded from every mean; counted in n_absent.",
    "missed": "Ground truth non-empty, prediction empty: dice = 0 and surface_dice = 0 (enter their means); hd95 = "
    "null and assd = null (undefined; excluded from their means); counted in n_missed.",
    "false_positive": "Ground truth empty, prediction non-empty: dice = 0 and surface_dice = 0 (enter their means); "
    "hd95 = null and assd = null (excluded from their means); counted in n_false_positive.",
    "summary": "Per label: mean and sample standard deviation (ddof=1, null below 2 values) over cases, "
    "ignoring nulls; n = cases with a Dice value, n_hd95 = cases with an HD95 value (n_assd: an ASSD value). "
    "'mean' = unweighted mean over labels of the per-label means (labels without any value are skipped).",
    "null": "JSON null (empty CSV cell) stands for an undefined value (NaN); JSON files never contain NaN.",
}


def as_label_map(array: np.ndarray, what: str = "label map") -> np.ndarray:
    """Return ``array`` as a non-negative integer label map.

    Float arrays (as NIfTI files often store labels) are accepted when every value is a whole number;
    probabilities or negative values raise ValueError naming ``what``.
    """
    arr = np.asarray(array)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{what} has dtype {arr.dtype}; expected integer label values.")
        rounded = np.rint(arr)
        if not np.all(np.isfinite(arr)) or np.max(np.abs(arr - rounded), initial=0.0) > 1e-3:
            raise ValueError(
                f"{what} contains non-integer values (e.g. probabilities); expected a map of label values."
            )
        arr = rounded.astype(np.int32)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} contains negative values (minimum {arr.min()}); label values must be >= 0.")
    return arr


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(sp) == 1:
        sp = sp * ndim
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm per voxel along each axis); got {spacing!r}.")
    return sp


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    # One voxel of margin so that the crop's border is background, exactly like the uncropped volume
    # (erosion treats outside-the-array as background, so surfaces and distances are unchanged).
    return tuple(
        slice(max(min(sa.start, sb.start) - 1, 0), min(max(sa.stop, sb.stop) + 1, n)) for sa, sb, n in zip(a, b, shape)
    )


def _dice_hd95(p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """Dice and HD95 of two non-empty boolean masks through MONAI; inputs are (spatial...)."""
    pt = torch.from_numpy(np.ascontiguousarray(p))[None, None]  # (1, 1, *spatial)
    gt = torch.from_numpy(np.ascontiguousarray(g))[None, None]
    dice = compute_dice(pt.float(), gt.float(), include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated get_mask_edges argument internally; not ours to fix.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(pt, gt, include_background=True, percentile=95, spacing=list(spacing))
    return float(dice.reshape(-1)[0]), float(hd.reshape(-1)[0])


def _surface(p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> tuple[float, float]:
    """Normalised surface Dice at ``tolerance_mm`` and ASSD (mm) of two non-empty boolean masks, through MONAI."""
    pt = torch.from_numpy(np.ascontiguousarray(p))[None, None].float()
    gt = torch.from_numpy(np.ascontiguousarray(g))[None, None].float()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = compute_surface_dice(pt, gt, [float(tolerance_mm)], include_background=True, spacing=list(spacing))
        assd = compute_average_surface_distance(pt, gt, include_background=True, symmetric=True, spacing=list(spacing))
    return float(nsd.reshape(-1)[0]), float(assd.reshape(-1)[0])


def check_tolerance(tolerance_mm: float) -> float:
    t = float(tolerance_mm)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"the surface-Dice tolerance must be 0 or more millimetres, got {tolerance_mm!r}.")
    return t


def compute_case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    classes: Mapping[int, str],
    surface_tolerance_mm: float | None = None,
) -> dict[int, dict[str, float | str]]:
    """Dice and HD95 (mm) of every class in one case.

    Args:
        pred, label: integer label maps of the same shape (spatial dims only, e.g. (X, Y, Z)).
        spacing: voxel size in mm along each axis of the arrays (anisotropic allowed).
        classes: ``{label_value: name}``; label values not listed are ignored.
        surface_tolerance_mm: with a tolerance, also ``"surface_dice"`` (normalised surface Dice at that
            tolerance) and ``"assd"`` (mm).
    Returns:
        ``{label_value: {"dice": float, "hd95": float, "status": str}}`` (plus ``"surface_dice"``, ``"assd"``)
        with NaN where a value is undefined; see ``CONVENTIONS`` for the empty-mask rules.
    """
    surface = surface_tolerance_mm is not None
    tol = check_tolerance(cast(float, surface_tolerance_mm)) if surface else 0.0
    pred = as_label_map(pred, "prediction")
    label = as_label_map(label, "ground truth")
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {label.shape}.")
    sp = _check_spacing(spacing, label.ndim)
    values = sorted(int(v) for v in classes)
    if not values:
        raise ValueError("classes is empty: nothing to evaluate.")
    top = max(values)
    # One pass over each volume finds every organ's bounding box (None when the organ is absent).
    boxes_p = ndimage.find_objects(pred, max_label=top)
    boxes_g = ndimage.find_objects(label, max_label=top)

    out: dict[int, dict[str, float | str]] = {}
    for v in values:
        bp, bg = boxes_p[v - 1], boxes_g[v - 1]
        e: dict[str, float | str]
        if bp is None and bg is None:
            e = {"dice": math.nan, "hd95": math.nan, "status": ABSENT}
            e.update({"surface_dice": math.nan, "assd": math.nan} if surface else {})
        elif bp is None or bg is None:
            e = {"dice": 0.0, "hd95": math.nan, "status": MISSED if bp is None else FALSE_POSITIVE}
            e.update({"surface_dice": 0.0, "assd": math.nan} if surface else {})
        else:
            box = _union_box(bp, bg, label.shape)
            p, g = pred[box] == v, label[box] == v
            dice, hd95 = _dice_hd95(p, g, sp)
            e = {"dice": dice, "hd95": hd95, "status": OK}
            if surface:
                e["surface_dice"], e["assd"] = _surface(p, g, sp, tol)
        out[v] = e
    return out


def _finite(values: Iterable[float | str | None]) -> np.ndarray:
    arr = np.array([math.nan if v is None else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if x.size >= 2 else math.nan


def summarize(
    cases: Mapping[str, Mapping[int | str, Mapping[str, float | str | None]]], classes: Mapping[int, str]
) -> dict[str, dict[str, float | int]]:
    """Summary over cases for the given classes (any subset of the evaluated ones).

    ``cases`` is ``{case: {label: {"dice", "hd95", "status"}}}`` with int or str label keys and NaN or None for
    undefined values (so the ``"cases"`` of a metrics.json works as is). Returns
    ``{"<label>": {"dice_mean", "dice_std", "hd95_mean", "hd95_std", "n", "n_hd95", "n_absent", "n_missed",
    "n_false_positive"}, "mean": {"dice_mean", "hd95_mean", "n_labels"}}`` with NaN for undefined values.
    """
    summary: dict[str, dict[str, float | int]] = {}
    for v in sorted(int(k) for k in classes):
        entries = []
        for case, per_label in cases.items():
            entry = per_label.get(v, per_label.get(str(v)))
            if entry is None:
                raise ValueError(f"case {case!r} has no result for label {v}; was it evaluated with these classes?")
            entries.append(entry)
        dice = _finite(e.get("dice") for e in entries)
        hd = _finite(e.get("hd95") for e in entries)
        status = [e.get("status") for e in entries]
        summary[str(v)] = {
            "dice_mean": _mean(dice),
            "dice_std": _std(dice),
            "hd95_mean": _mean(hd),
            "hd95_std": _std(hd),
            "n": int(dice.size),
            "n_hd95": int(hd.size),
            "n_absent": status.count(ABSENT),
            "n_missed": status.count(MISSED),
            "n_false_positive": status.count(FALSE_POSITIVE),
        }
        if entries and all("surface_dice" in e for e in entries):
            nsd = _finite(e.get("surface_dice") for e in entries)
            assd = _finite(e.get("assd") for e in entries)
            summary[str(v)].update(
                {
                    "surface_dice_mean": _mean(nsd),
                    "surface_dice_std": _std(nsd),
                    "assd_mean": _mean(assd),
                    "assd_std": _std(assd),
                    "n_assd": int(assd.size),
                }
            )
    dice_means = _finite(s["dice_mean"] for s in summary.values())
    hd_means = _finite(s["hd95_mean"] for s in summary.values())
    summary["mean"] = {"dice_mean": _mean(dice_means), "hd95_mean": _mean(hd_means), "n_labels": int(dice_means.size)}
    label_stats = [s for k, s in summary.items() if k != "mean"]
    if label_stats and all("surface_dice_mean" in s for s in label_stats):
        summary["mean"]["surface_dice_mean"] = _mean(_finite(s["surface_dice_mean"] for s in label_stats))
        summary["mean"]["assd_mean"] = _mean(_finite(s["assd_mean"] for s in label_stats))
    return summary
