"""Organ statistics of a label map on its CT: volume in mL and HU inside each organ, in the scan's own grid.

``organ_statistics`` is what ``medhpm predict --statistics`` writes (``statistics.json``, ``statistics.csv``)
and what ``Predictor.predict(..., statistics=True)`` returns. The voxel volume is ``|det(A)|`` of the affine's
3x3 part (mm^3, so oblique and anisotropic grids count right); HU are the scan's own values on its own grid
(never the resampled network input). ``hu_std`` is the population standard deviation (ddof=0) of the voxels
inside the mask; an organ with no voxel has volume 0 and null HU.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Mapping

import numpy as np

__all__ = ["organ_statistics", "statistics_csv", "STATISTICS_CONVENTIONS"]

STATISTICS_CONVENTIONS = {
    "volume_ml": "voxels x |det(affine[:3, :3])| / 1000: millilitres, in the scan's own voxel grid",
    "hu_mean": "mean of the scan's own intensities (HU) over the organ's voxels; null when it has none",
    "hu_std": "population standard deviation (ddof=0) of the same voxels; null when the organ has none",
}


def organ_statistics(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: Mapping[int, str]
) -> dict[str, dict]:
    """``{str(value): {"name", "voxels", "volume_ml", "hu_mean", "hu_std"}}`` for every class of ``classes``.

    ``image`` (HU) and ``label`` share one grid (same shape); ``affine`` is that grid's voxel -> mm matrix.
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} differs from label map shape {label.shape}")
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    flat_l = label.ravel()
    top = max([int(v) for v in classes] + [int(flat_l.max()) if flat_l.size else 0]) + 1
    values = image.ravel().astype(np.float64)
    counts = np.bincount(flat_l, minlength=top)
    sums = np.bincount(flat_l, weights=values, minlength=top)
    means = np.divide(sums, counts, out=np.zeros(top), where=counts > 0)
    squares = np.bincount(flat_l, weights=(values - means[flat_l]) ** 2, minlength=top)  # two-pass variance
    out: dict[str, dict] = {}
    for v, name in sorted((int(k), n) for k, n in classes.items()):
        n = int(counts[v])
        out[str(v)] = {
            "name": name,
            "voxels": n,
            "volume_ml": n * voxel_ml,
            "hu_mean": float(means[v]) if n else None,
            "hu_std": float(math.sqrt(squares[v] / n)) if n else None,
        }
    return out


def statistics_csv(per_case: Mapping[str, Mapping[str, Mapping]]) -> str:
    """One row per case and organ: case, label, name, voxels, volume_ml, hu_mean, hu_std (empty = null)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", "name", "voxels", "volume_ml", "hu_mean", "hu_std"])
    cell = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731
    for case, organs in per_case.items():
        for v, s in organs.items():
            w.writerow([case, v, s["name"], s["voxels"], cell(s["volume_ml"]), cell(s["hu_mean"]), cell(s["hu_std"])])
    return buf.getvalue()
