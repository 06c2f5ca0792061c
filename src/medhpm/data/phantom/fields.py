"""Smooth random fields: cubic B-splines on a lattice fixed in millimetres around the body centre.

They give the texture of every tissue, the bumps on organ surfaces, the smooth deformation of the whole
template and the small-bowel loops. The whole lattice is drawn for every field, so a seed gives the same
field at any grid size or spacing.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_F32 = np.float32


def _bspline_weights(coords: np.ndarray, lo: float, step: float, count: int):
    """First lattice index and the 4 cubic B-spline weights for each coordinate.

    Lattice node k sits at lo + step * (k - 1); coordinates beyond the lattice are clamped.
    """
    t = np.clip((coords.astype(np.float64) - lo) / step + 1.0, 1.0, count - 2.0 - 1e-6)
    i = np.floor(t).astype(np.int64)
    f = t - i
    w = np.stack(
        [(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6], axis=1
    ).astype(_F32)
    return i - 1, w


def _bspline_matrix(coords: np.ndarray, lo: float, step: float, count: int):
    """Dense (len(coords), used nodes) weight matrix and the first used lattice node."""
    first, w = _bspline_weights(coords, lo, step, count)
    base = int(first.min())
    width = int(first.max()) + 4 - base
    m = np.zeros((coords.size, width), dtype=_F32)
    rows = np.arange(coords.size)
    for k in range(4):
        m[rows, first - base + k] = w[:, k]
    return base, m


# Lattice box (mm, around the body centre) in which smooth fields are defined; outside it they are
# held constant. Fixed in physical units so that a seed gives the same anatomy at any resolution.
_FIELD_BOX = ((-240.0, 240.0), (-240.0, 240.0), (-220.0, 220.0))
# Standard deviation of a tensor-product cubic B-spline with unit-variance coefficients
# (about sqrt(0.48) per axis); dividing by it gives roughly unit-variance fields everywhere.
_BSPLINE_STD = 0.48**1.5


def _smooth_field(rng: np.random.Generator, axes: Sequence[np.ndarray], step: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance random field with correlation length ~ ``step`` mm."""
    counts = [int(math.ceil((hi - lo) / step)) + 3 for lo, hi in _FIELD_BOX]
    # The whole lattice is drawn (so the field does not depend on the grid); only the part under
    # the grid is used.
    coef = rng.standard_normal(counts, dtype=_F32)
    (bx0, bx), (by0, by), (bz0, bz) = (_bspline_matrix(axes[a], _FIELD_BOX[a][0], step, counts[a]) for a in range(3))
    coef = coef[bx0 : bx0 + bx.shape[1], by0 : by0 + by.shape[1], bz0 : bz0 + bz.shape[1]]
    t = np.tensordot(coef, bz, axes=(2, 1))  # (cx, cy, nz)
    t = np.tensordot(by, t, axes=(1, 1))  # (ny, cx, nz)
    t = np.tensordot(bx, t, axes=(1, 1))  # (nx, ny, nz)
    out = np.ascontiguousarray(t)
    out *= _F32(1.0 / _BSPLINE_STD)
    return out
